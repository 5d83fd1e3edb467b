"""Post-hoc defenses for a shared LoRA: edits of the weights before the file is shared.

Every post-hoc defense is a pure function ``defense(lora, strength) -> new lora`` on the in-memory
state dict (peft naming with component prefix, :func:`core.finetune.lora.lora_state_dict`:
``unet.<module>.lora_A.weight`` A: r x in, or r x in x kh x kw for convolutions;
``...lora_B.weight`` B: out x r, or out x r x 1 x 1). The input is never modified; the result is
float32 on the input's device; keys other than ``lora_A``/``lora_B`` weights are copied unchanged.
What is shared is the file, and the file holds A and B, so every defense acts on A and B (or, for
rank truncation, on their product); the LoRA's scale alpha / r is left alone.

- :func:`weight_noise` ``(lora, sigma, seed)``: adds i.i.d. Gaussian noise to every A and B entry,
  ``t + sigma * rms(t) * N(0, 1)`` with ``rms(t) = sqrt(mean(t**2))`` per tensor: sigma is the noise
  std relative to the tensor's RMS (sigma = 1: noise as large as the weights). Seeded (one CPU
  generator, tensors in sorted key order), so the same call gives the same file.
- :func:`prune` ``(lora, fraction)``: magnitude pruning per tensor: in every A and every B the
  ``round(fraction * numel)`` entries of smallest |value| are set to 0 (ties broken by position).
  Per tensor, not global: A (random init, O(1/r)) and B (starts at 0) live on different scales, so a
  global threshold would wipe out B, i.e. the whole update, at any fraction.
- :func:`quantize` ``(lora, bits)``: symmetric per-tensor uniform quantization, dequantized back to
  float32: ``scale = max|t| / (2**(bits-1) - 1)``, ``t -> clamp(round(t / scale)) * scale``. Levels
  are the integers -qmax..qmax times one scale, so at most ``2**bits - 1`` distinct values per tensor
  (15 at 4 bits, 255 at 8 bits; the symmetric grid leaves the integer -2**(bits-1) unused); the
  largest-|.| entry is kept (up to float rounding), every other entry moves by at most scale / 2.
- :func:`rank_truncate` ``(lora, keep, pad=True)``: per module, the thin SVD of the update
  dW = B A (convolutions: A flattened to r x (in kh kw)) is cut to its top ``keep`` singular
  directions and refactored in balanced form ``B' = U sqrt(S)``, ``A' = sqrt(S) V^T``, so B' A' is
  the best rank-``keep`` approximation of B A (Eckart-Young). By default (``pad=True``) the factors
  are zero-padded back to rank r: every shape, the rank, alpha / r and the file metadata stay valid
  for downstream code (merging, the attacker, the file validator). ``pad=False`` returns rank-``keep``
  factors (the file's rank shrinks; keep the *scale* by saving with alpha' = alpha * keep / r).
  ``keep >= r`` changes no product but still replaces A and B by their canonical SVD factors (which
  removes whatever the A/B split itself carries, e.g. the random initial A).

:data:`DEFENSES` maps a name to ``Defense(fn, strengths, label)``: ``fn(lora, strength)``, the
strengths of the study (weakest first) and what the strength means, for the study and the UI.

DP-SGD fine-tuning (:mod:`core.defenses.dp`) is the training-time defense.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


# 1. post-hoc defenses on a LoRA state dict ---------------------------------------------------


def is_factor(key: str) -> bool:
    return key.endswith((A_SUFFIX, B_SUFFIX))


def _map_factors(lora: dict, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> dict:
    """A new dict: ``fn(key, float32 copy)`` for every A and B, plain copies of anything else."""
    return {k: fn(k, v.detach().float().clone()) if is_factor(k) else v.detach().clone() for k, v in lora.items()}


def weight_noise(lora: dict, sigma: float, seed: int = 0) -> dict:
    """Gaussian noise of std ``sigma * rms(t)`` added to every A and B tensor ``t`` (seeded)."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}")
    g = torch.Generator().manual_seed(int(seed))
    draws = {k: torch.randn(lora[k].shape, generator=g) for k in sorted(lora) if is_factor(k)}

    def add(k, t):
        return t + (sigma * t.pow(2).mean().sqrt()) * draws[k].to(t.device)

    return _map_factors(lora, add)


def prune(lora: dict, fraction: float) -> dict:
    """Zero the ``round(fraction * numel)`` smallest-|.| entries of every A and every B (per tensor)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")

    def cut(_, t):
        k = round(fraction * t.numel())
        mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
        mask[torch.argsort(t.abs().flatten(), stable=True)[:k]] = True
        return t.masked_fill(mask.view(t.shape), 0)

    return _map_factors(lora, cut)


def quantize(lora: dict, bits: int) -> dict:
    """Symmetric per-tensor uniform quantization of every A and B to ``bits`` bits, dequantized."""
    if int(bits) != bits or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 2..16, got {bits!r}")
    qmax = 2 ** (int(bits) - 1) - 1

    def quant(_, t):
        scale = t.abs().max() / qmax
        if scale == 0:
            return t
        return torch.round(t / scale).clamp(-qmax, qmax) * scale

    return _map_factors(lora, quant)


def truncated_factors(b: torch.Tensor, a: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors (out x k, k x in), k = min(keep, r), of the best rank-``keep``
    approximation of ``b @ a`` (b: out x r, a: r x in), via QR of each factor and the SVD of the
    small r x r core (cheap for SD-sized layers; float64)."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(keep, len(s))
    root = s[:k].sqrt()
    return (qb @ u[:, :k] * root).float(), (root[:, None] * (vh[:k] @ qa.T)).float()


def rank_truncate(lora: dict, keep: int, pad: bool = True) -> dict:
    """Per module, B A cut to its top ``keep`` singular directions (see the module docstring);
    ``pad=True`` (default) keeps rank r by zero-padding, ``pad=False`` returns rank-``keep`` factors."""
    if int(keep) != keep or keep < 1:
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    out = _map_factors(lora, lambda _, t: t)
    for ka in [k for k in lora if k.endswith(A_SUFFIX)]:
        kb = ka[: -len(A_SUFFIX)] + B_SUFFIX
        a, b = out[ka], out[kb]
        r = a.shape[0]
        b2, a2 = truncated_factors(b.reshape(b.shape[0], r), a.reshape(r, -1), int(keep))
        if pad and a2.shape[0] < r:
            b2 = torch.cat([b2, b2.new_zeros(b2.shape[0], r - b2.shape[1])], 1)
            a2 = torch.cat([a2, a2.new_zeros(r - a2.shape[0], a2.shape[1])], 0)
        k = a2.shape[0]
        out[ka] = a2.reshape(k, *a.shape[1:]).to(a.device)
        out[kb] = b2.reshape(b.shape[0], k, *b.shape[2:]).to(b.device)
    return out


class Defense(NamedTuple):
    fn: Callable[[dict, float], dict]  # fn(lora, strength) -> defended lora
    strengths: tuple  # the study's strengths, weakest first
    label: str  # what the strength means


DEFENSES: dict[str, Defense] = {
    "weight_noise": Defense(weight_noise, (0.1, 0.3, 1.0, 3.0), "noise std / weight RMS (per tensor)"),
    "prune": Defense(prune, (0.5, 0.8, 0.9, 0.95, 0.99), "fraction of A and B entries set to zero"),
    "quantize": Defense(quantize, (8, 6, 4, 3, 2), "bits per weight (symmetric, per tensor)"),
    # keep = 4 is rank 4's full product in canonical SVD factors (no change to B A)
    "rank_truncate": Defense(
        rank_truncate, (4, 3, 2, 1), "singular directions of B A kept (rank stays r, zero-padded)"
    ),
}


def apply_defense(lora: dict, name: str, strength) -> dict:
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; known: {', '.join(DEFENSES)}")
    return DEFENSES[name].fn(lora, strength)
