"""Busy and lazy layers: which UNet layers a fine-tune actually moves (Liu et al., arXiv 2405.00466).

Liu et al. (*Lazy Layers to Make Fine-Tuned Diffusion Models More Traceable*) observe that a
fine-tune concentrates its parameter change in a few "busy" layers while most layers barely move
("lazy"), and that copying only the busiest layers of the fine-tuned model into the source model
recovers most of the fine-tune (their Fig. 3). This module measures both for the app's LoRA and
for a plain full fine-tune (``METHODS.md`` section 2). Choices:

- **Layer** = one Linear / Conv2d weight of the UNet. For a LoRA: every module that carries an
  adapter, its change dW = (alpha / r) B A (alpha defaults to r, like :func:`core.finetune.lora.merge_lora_`;
  convolutions flattened to out x (in kh kw), as the merge does). For a full fine-tune: every weight
  tensor with 2 or more dimensions; biases and normalisation scales/shifts (1-D) are **not**
  ranked: :func:`vector_change` reports them as one number per kind, and a swap never copies a norm.
- **Relative change** ||dW||_F / ||W0||_F (the Custom Diffusion measure, METHODS.md): how far the layer
  moved, in units of its own size, so that wide and narrow layers compare.
- **Fraction moved**: share of the entries of dW with |dW| > ``TAU`` * mean|W0|, ``TAU`` = 0.01 (an
  entry moved by more than 1 % of the layer's typical weight: the "small threshold" of METHODS.md).
  Measured on the embedded model: a full fine-tune (40 steps, lr 5e-5) moved 0.4 % (laziest) to 76 %
  (busiest) of a layer's entries, so the threshold separates them; a default-recipe LoRA (80 steps)
  moves 92-99 % of the entries of *every* layer it adapts (its relative change is 17-90 %), since
  B A is dense: with a LoRA, read the relative change, not this fraction.
- **Block group**: ``down_blocks.i`` / ``mid_block`` / ``up_blocks.i`` (``conv_in``, ``time_embedding``,
  ``conv_out`` for the rest); layers are listed in the UNet's forward order (input to output), which
  is also the heatmap's order.
- **Busy / lazy**: ranking by relative change (:func:`rank_layers`).
- **Swap curve** (their Fig. 3, in this app's utility measure; :mod:`core.layers.swap`): keep only
  the k busiest layers of the fine-tune (drop the other LoRA modules / keep the base weights
  elsewhere) and score the result with :mod:`core.faces.utility` (dlib distance of 4 samples with the
  true trigger to the private photos, beside the base model's class-prompt floor).
- **Full fine-tune** (:func:`core.finetune.full.full_finetune`) for comparison: every UNet parameter
  trained with the DreamBooth objective of :mod:`core.finetune.lora` (same prompts, prior-preservation
  class latents, noise / timestep draws from the same seed), AdamW without weight decay (decay would
  shrink every weight and make lazy layers look busy), lr ``FULL_LR`` (a choice, not tuned).

CLI: ``python -m core.layers PHOTOS... [--steps N] [--full] [--out docs/results/layers.json]``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import numpy as np
import torch

TAU = 0.01  # an entry of dW counts as "moved" when |dW| > TAU * mean |W0| of its layer
DEFAULT_KS = (1, 3, 10, 30, None)  # swap-curve layer counts; None = every layer

# plain-language names of the layer kinds (the app's table and the CLI print them)
KIND_LABELS = {
    "attn1": "self-attention",
    "attn2": "cross-attention (reads the prompt)",
    "ff": "feed-forward",
    "proj": "transformer in/out projection",
    "conv": "ResNet convolution",
    "shortcut": "ResNet shortcut",
    "time": "timestep projection",
    "resample": "down/up-sampling convolution",
    "io": "input/output convolution",
    "other": "other",
}


@dataclass(frozen=True)
class LayerChange:
    """How much one UNet layer moved between the base and the fine-tuned weights."""

    name: str  # module path in the UNet, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    group: str  # UNet block: "down_blocks.1", "mid_block", "up_blocks.0", ...
    kind: str  # a key of KIND_LABELS
    relative: float  # ||dW||_F / ||W0||_F
    moved: float  # fraction of entries with |dW| > TAU * mean|W0|
    delta_norm: float  # ||dW||_F
    base_norm: float  # ||W0||_F
    numel: int  # entries of the weight


# 1. naming and order -------------------------------------------------------------------------


def block_group(name: str) -> str:
    """The UNet block a module belongs to: "down_blocks.1", "mid_block", "up_blocks.0", "conv_in"..."""
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def layer_kind(name: str) -> str:
    """The kind of a UNet module (a key of ``KIND_LABELS``)."""
    last = name.rsplit(".", 1)[-1]
    if ".attn1." in name:
        return "attn1"
    if ".attn2." in name:
        return "attn2"
    if ".ff." in name:
        return "ff"
    if last in ("proj_in", "proj_out"):
        return "proj"
    if "samplers." in name:
        return "resample"
    if ".resnets." in name:
        return {"conv1": "conv", "conv2": "conv", "conv_shortcut": "shortcut", "time_emb_proj": "time"}.get(
            last, "other"
        )
    if name.startswith(("time_embedding", "add_embedding")):
        return "time"
    if name in ("conv_in", "conv_out"):
        return "io"
    return "other"


_GROUP_ORDER = {
    "conv_in": 0,
    "time_embedding": 1,
    "add_embedding": 1,
    "down_blocks": 2,
    "mid_block": 3,
    "up_blocks": 4,
    "conv_norm_out": 5,
    "conv_out": 6,
}


def group_key(group: str) -> tuple:
    head, _, idx = group.partition(".")
    return _GROUP_ORDER.get(head, 7), int(idx) if idx.isdigit() else 0, group


def forward_order(names) -> list[str]:
    """Module names sorted in the UNet's forward order: blocks input to output, and inside a block
    resnet j, attention j, resnet j+1 ..., samplers last (registration order breaks ties)."""
    names = list(names)

    def key(item):
        i, n = item
        m = re.search(r"\.(resnets|attentions)\.(\d+)(\.|$)", n)
        inner = (
            (int(m.group(2)), 0 if m.group(1) == "resnets" else 1)
            if m
            else ((10**6, 0) if "samplers." in n else (0, 0))
        )
        return group_key(block_group(n)), inner, i

    return [n for _, n in sorted(enumerate(names), key=key)]


def short_name(name: str) -> str:
    """The module path inside its block, without the single transformer block's index."""
    group = block_group(name)
    s = name[len(group) + 1 :] if name != group else name
    return s.replace("transformer_blocks.0.", "") or name


# 2. per-layer change -------------------------------------------------------------------------


@torch.no_grad()
def layer_change(name: str, w0: torch.Tensor, dw: torch.Tensor, tau: float = TAU) -> LayerChange:
    """The change record of one layer with base weight ``w0`` and change ``dw`` (same number of entries)."""
    w0 = w0.detach().float().reshape(-1).cpu()
    dw = dw.detach().float().reshape(-1).cpu()
    if w0.numel() != dw.numel():
        raise ValueError(f"{name}: change has {dw.numel()} entries, weight {w0.numel()}")
    base, delta = float(w0.norm()), float(dw.norm())
    moved = float((dw.abs() > tau * w0.abs().mean()).float().mean()) if w0.numel() else 0.0
    relative = delta / base if base > 0 else (0.0 if delta == 0 else float("inf"))  # inf: a zero weight that moved
    return LayerChange(name, block_group(name), layer_kind(name), relative, moved, delta, base, int(w0.numel()))


def lora_modules(lora: dict, part: str = "unet") -> list[str]:
    """Names of the ``part`` modules that carry an adapter in a peft-named LoRA state dict."""
    head = f"{part}."
    return [k[len(head) : -len(".lora_A.weight")] for k in lora if k.startswith(head) and k.endswith(".lora_A.weight")]


def lora_delta(lora: dict, module: str, alpha: float | None = None, part: str = "unet") -> torch.Tensor:
    """dW = (alpha / r) B A of one module, flattened to out x (in kh kw) (alpha defaults to r)."""
    a = lora[f"{part}.{module}.lora_A.weight"].float()
    b = lora[f"{part}.{module}.lora_B.weight"].float()
    r = a.shape[0]
    return ((alpha if alpha is not None else r) / r) * (b.reshape(b.shape[0], -1) @ a.reshape(r, -1))


def lora_layer_change(pipe, lora: dict, alpha: float | None = None, tau: float = TAU) -> list[LayerChange]:
    """One :class:`LayerChange` per UNet module with a LoRA (text-encoder adapters are left out), in
    the UNet's forward order."""
    mods = dict(pipe.unet.named_modules())
    index = {
        n: i for i, n in enumerate(mods)
    }  # registration order breaks forward_order's ties, not the file's key order
    out = []
    for name in forward_order(sorted(lora_modules(lora), key=lambda n: index.get(n, len(index)))):
        if name not in mods:
            raise KeyError(f"the LoRA adapts {name!r}, which this UNet does not have")
        out.append(layer_change(name, mods[name].weight, lora_delta(lora, name, alpha), tau))
    return out


def is_layer_weight(key: str, t: torch.Tensor) -> bool:
    """A Linear / Conv2d weight of a state dict (2+ dimensions; adapters excluded)."""
    return key.endswith(".weight") and t.dim() >= 2 and "lora_" not in key


def full_layer_change(w0: dict, wt: dict, tau: float = TAU) -> list[LayerChange]:
    """One :class:`LayerChange` per Linear / Conv2d weight of two UNet state dicts (base ``w0`` and
    fine-tuned ``wt``), in forward order. Biases and norm parameters: :func:`vector_change`."""
    names = [k[: -len(".weight")] for k, t in w0.items() if is_layer_weight(k, t)]
    missing = [n for n in names if f"{n}.weight" not in wt]
    if missing:
        raise KeyError(f"the fine-tuned state dict lacks {len(missing)} weights, e.g. {missing[0]!r}")
    return [
        layer_change(n, w0[f"{n}.weight"], wt[f"{n}.weight"].float().cpu() - w0[f"{n}.weight"].float().cpu(), tau)
        for n in forward_order(names)
    ]


@torch.no_grad()
def vector_change(w0: dict, wt: dict) -> dict[str, float]:
    """Relative change ||dv|| / ||v0|| over all 1-D parameters of a full fine-tune, per kind:
    {"bias": ..., "norm": ...} (norm = GroupNorm / LayerNorm scale and shift)."""
    sums: dict[str, list[float]] = {}
    for k, v in w0.items():
        if v.dim() != 1 or "lora_" in k or k not in wt:
            continue
        kind = "norm" if re.search(r"norm", k.rsplit(".", 1)[0].rsplit(".", 1)[-1]) else "bias"
        d, b = sums.setdefault(kind, [0.0, 0.0]), v.float().cpu()
        d[0] += float((wt[k].float().cpu() - b).pow(2).sum())
        d[1] += float(b.pow(2).sum())
    return {kind: (d / b) ** 0.5 if b > 0 else 0.0 for kind, (d, b) in sums.items()}


def rank_layers(changes: list[LayerChange], n: int | None = None) -> tuple[list[LayerChange], list[LayerChange]]:
    """(busy, lazy): the layers by relative change, largest first, and smallest first; ``n`` of each
    (default all, so ``busy`` is the full ranking and ``lazy`` its reverse)."""
    busy = sorted(changes, key=lambda c: (-c.relative, c.name))
    n = len(busy) if n is None else max(0, min(int(n), len(busy)))
    return busy[:n], busy[::-1][:n]


def concentration(changes: list[LayerChange], k: int) -> float:
    """Share of the fine-tune's total squared change sum ||dW||_F^2 held by its ``k`` busiest layers
    (by relative change)."""
    total = sum(c.delta_norm**2 for c in changes)
    top = rank_layers(changes, k)[0]
    return sum(c.delta_norm**2 for c in top) / total if total > 0 else 0.0


# 3. over the training steps ------------------------------------------------------------------


@dataclass
class Trajectory:
    """Per-layer relative change at several steps (rows: layers in forward order; columns: steps)."""

    matrix: np.ndarray  # layers x steps, relative change ||W_t - W_0|| / ||W_0||
    names: list[str]
    steps: list[int]
    groups: list[str]
    kinds: list[str] = field(default_factory=list)


def trajectory_from_changes(by_step: dict[int, list[LayerChange]]) -> Trajectory:
    """Stack per-step change lists (same layers at every step) into a :class:`Trajectory`."""
    steps = sorted(by_step)
    if not steps:
        raise ValueError("no steps to stack")
    first = by_step[steps[0]]
    names = [c.name for c in first]
    cols = []
    for s in steps:
        got = {c.name: c.relative for c in by_step[s]}
        if set(got) != set(names):
            raise ValueError(f"step {s} has other layers than step {steps[0]}")
        cols.append([got[n] for n in names])
    return Trajectory(
        np.asarray(cols, dtype=np.float64).T.reshape(len(names), len(steps)),
        names,
        steps,
        [c.group for c in first],
        [c.kind for c in first],
    )


def trajectory_changes(pipe, checkpoints: dict[int, dict], alpha: float | None = None) -> Trajectory:
    """Relative change of every LoRA layer at each checkpoint ({step: peft LoRA state dict})."""
    return trajectory_from_changes({int(s): lora_layer_change(pipe, lo, alpha) for s, lo in checkpoints.items()})


def pipeline_with_state(pipe, state: dict):
    """A pipeline view whose UNet is a copy of the base's with ``state`` loaded (base not modified)."""
    from core.model.pipeline import private_view

    view = private_view(pipe)
    unet = copy.deepcopy(pipe.unet)
    unet.load_state_dict({k: v.to(unet.dtype) for k, v in state.items()})
    view.unet = unet.to(pipe.device)
    return view


def base_state(pipe) -> dict:
    """The base UNet's state dict as CPU float32 copies."""
    return {k: v.detach().float().cpu().clone() for k, v in pipe.unet.state_dict().items()}
