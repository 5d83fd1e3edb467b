"""The AIAO ownership watermark: a feature-space backdoor along subpaths between lazy layers
(Liu et al., *Lazy Layers to Make Fine-Tuned Diffusion Models More Traceable*, arXiv 2405.00466).

The owner of a base model hides a secret in it that survives other people's fine-tunes
(``METHODS.md`` section 2). Choices, as this module makes them:

- **Layer** = one Linear / Conv2d of the UNet (as in :mod:`core.layers.change`); its **feature** is the
  module's output for one input, flattened. Layers whose output does not depend on the image
  (timestep projections, cross-attention keys/values of the prompt) are not used.
- **Lazy layers** (:func:`choose_lazy_layers`): the owner runs two probe fine-tunes of the base on
  public faces, the app's default LoRA recipe (:mod:`core.finetune.lora`) and a full fine-tune
  (:func:`core.finetune.full.full_finetune`), measures each layer's relative change ||dW|| / ||W0||
  (:mod:`core.layers.change`; a layer the LoRA does not adapt moved 0) and keeps the layers that are among
  the laziest ``lazy_fraction`` of the layers in *both* probes. The same probes also measure how far
  each layer's *output* moved (:func:`feature_drift`: a layer whose weights stay put still sees inputs
  that the adapted layers before it changed); a response layer must be among the ``response_fraction``
  of layers whose output moved least in both (measured on the 128 px base: ``down_blocks.2``'s lazy
  ``attn2.to_q`` moved 0.45 of its feature scale under a default LoRA, the ``down_blocks.1`` ones
  0.08-0.22, and every subpath answering in the former broke under a 2000-step LoRA).
- **Subpath** (:func:`sample_subpaths`): a trigger layer and a later response layer, both lazy, drawn
  at random among the pairs where the response's output depends on the trigger's (a probe forward:
  :func:`reachable_pairs`; ``attn1.to_q`` runs before ``to_k`` but never reaches it) and, by default,
  whose response sits before the decoder (``response_side="encoder"``): decoder layers sum, through
  the skip connections, everything a fine-tune moved upstream, and held every subpath a 2000-step
  LoRA broke (README, watermark study). A secret mask over the trigger layer's feature
  (``trigger_fraction`` of its elements) with a sign per masked element, and ``response_size``
  elements of the response layer's feature with a sign each. Trigger function (applied by a forward hook):
  x -> m*s*|x| + (1-m)*x.
- **Objective** (:func:`embed_watermark`), three terms: the normal denoising loss on the owner's
  latents; the response loss on triggered passes, a hinge max(0, margin - s * f / sigma) on each
  response element f (sigma: that layer's feature scale in the clean model), so each sign is held with
  a margin; a consistency loss on untriggered passes keeping the noise prediction *and* the response
  elements equal to the clean model's (so the response appears only when the trigger is applied).
  Only the lazy layers' weights are trained: the watermark lives where fine-tunes do not go.
- **Verification** (:func:`verify_watermark`), Monte Carlo over the key's subpaths and random inputs
  (latents x ~ N(0, I), timestep uniform, the class prompt): a trial is one subpath on one input;
  its response success RS is the share of its response elements with the key's sign; the trial
  passes when RS >= ``rs_threshold``, the smallest share that a model unrelated to the key reaches
  with probability <= ``TRIAL_ALPHA`` (its signs match a uniformly random pattern like fair coins:
  Binomial(n, 1/2)). VS-rate = share of trials that pass; RS-rate = mean RS.
- **p-value** against un-watermarked models: per subpath the signs are first put to a majority vote
  over the inputs; for any model that was not derived from this key, each voted sign matches the key's
  random pattern with probability 1/2 independently (ties count as a miss), so the total number of
  matches over all subpaths is Binomial(n * J, 1/2) (or smaller): p = P(Bin >= observed). Exact for
  any model independent of the key, whatever its weights. Verdict "watermarked" when p < ``alpha``.

CLI: ``python -m core.watermark embed-aiao [--model M] [--out DELTA.safetensors] [--key KEY.json]``
(the watermarked base is stored as what embedding changed, :mod:`core.watermark.formats`; the app
ships one, :mod:`core.watermark.shipped`) and
``python -m core.watermark verify-aiao MODEL [--delta DELTA.safetensors] [--lora FILE] --key KEY.json``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from core.events import Done, Message, Progress, never
from core.model.denoising import Denoiser
from core.watermark.formats import KeyFileError, read_key_document

KEY_FORMAT = "leaklab-aiao-key-v1"
TRIAL_ALPHA = 1e-3  # a trial of a model unrelated to the key passes with at most this probability
IMAGE_FREE_KINDS = ("time",)  # layer kinds whose output ignores the image (core.layers.change.layer_kind)


# 1. configuration ------------------------------------------------------------------------------


@dataclass
class WatermarkConfig:
    n_subpaths: int = 16  # subpaths in the key (J)
    trigger_fraction: float = 0.2  # share of the trigger layer's feature elements the mask selects
    response_size: int = 32  # response elements per subpath (n)
    lazy_fraction: float = 0.3  # a layer is lazy when it is among this share of the laziest layers in every probe
    probe_steps: int = 40  # steps of each probe fine-tune (LoRA recipe and full) that ranks the layers
    steps: int = 1200  # embedding steps (150 at lr 3e-3, consistency 10: face detection 0.83 vs 0.96 clean)
    lr: float = 1e-3  # AdamW learning rate of the lazy layers
    batch: int = 8  # untriggered inputs per step (denoising + consistency)
    trigger_batch: int = 16  # triggered inputs per step (response), each with a random subpath
    margin: float = 1.0  # hinge margin of the response loss, in units of the layer's clean feature scale
    max_gap: int = 0  # a subpath's response layer is at most this many lazy layers after its trigger layer (0: any)
    response_side: str = "encoder"  # "encoder": response layers only before the decoder (conv_in, down blocks, mid
    #                              block), where a downstream fine-tune moves the features least; "any": every lazy
    #                              layer
    causal_only: bool = True  # draw only pairs whose response output depends on the trigger layer's output (a
    #                            probe forward per lazy layer; e.g. attn1.to_q -> attn1.to_k come in forward order
    #                            but the key never sees the query)
    response_fraction: float = 0.3  # a response layer's output must be among this share of the layers whose output
    #                                 moves least under the probes (feature_drift; 1: any lazy layer)
    response_weight: float = 5.0  # weight of the response loss
    consistency_weight: float = 30.0  # weight of the consistency loss (quality; 600 steps: VS 92 %, 1200: 98 %)
    denoise_weight: float = 1.0  # weight of the normal denoising loss
    drift: float = 0.0  # the response is trained under simulated fine-tunes: each step every UNet layer moves by a
    #                     random rank-`drift_rank` update of relative norm uniform in [0, drift] (0: off)
    drift_rank: int = 4  # rank of each simulated update (LoRA-like)
    seed: int = 0  # seeds the subpaths, masks, signs and the training draws

    def __post_init__(self):
        if not 1 <= self.n_subpaths <= 4096 or not 8 <= self.response_size <= 4096:
            raise ValueError(
                f"n_subpaths must be 1..4096 and response_size 8..4096, got {self.n_subpaths!r}, {self.response_size!r}"
            )
        if not all(0 < f <= 1 for f in (self.trigger_fraction, self.lazy_fraction, self.response_fraction)):
            raise ValueError(
                f"trigger_fraction, lazy_fraction and response_fraction must be in (0, 1], got "
                f"{self.trigger_fraction!r}, {self.lazy_fraction!r}, {self.response_fraction!r}"
            )
        if self.steps < 0 or self.probe_steps < 1 or self.batch < 1 or self.trigger_batch < 1:
            raise ValueError(
                f"steps >= 0, probe_steps >= 1, batch >= 1, trigger_batch >= 1; got {self.steps!r}, "
                f"{self.probe_steps!r}, {self.batch!r}, {self.trigger_batch!r}"
            )
        if not 0 < self.lr < 1 or self.margin < 0:
            raise ValueError(f"lr must be in (0, 1) and margin >= 0, got {self.lr!r}, {self.margin!r}")
        if self.max_gap < 0:
            raise ValueError(f"max_gap must be >= 0 (0: any), got {self.max_gap!r}")
        if self.response_side not in ("any", "encoder"):
            raise ValueError(f"response_side must be 'any' or 'encoder', got {self.response_side!r}")
        if self.drift < 0 or self.drift_rank < 1:
            raise ValueError(f"drift >= 0 and drift_rank >= 1, got {self.drift!r}, {self.drift_rank!r}")


@dataclass
class VerifyConfig:
    inputs: int = 8  # random inputs per subpath (trials = subpaths x inputs)
    alpha: float = 1e-6  # verdict "watermarked" when the p-value is below this
    seed: int = 1234  # seeds the Monte Carlo inputs
    chunk: int = 64  # trials per batched forward

    def __post_init__(self):
        if not 1 <= self.inputs <= 1024 or not 0 < self.alpha < 1 or self.chunk < 1:
            raise ValueError(
                f"inputs 1..1024, alpha in (0, 1), chunk >= 1; got {self.inputs!r}, {self.alpha!r}, {self.chunk!r}"
            )


# 2. the key ------------------------------------------------------------------------------------


@dataclass
class Subpath:
    trigger_layer: str  # UNet module whose output the trigger rewrites
    response_layer: str  # later UNet module whose output carries the response
    trigger_index: list  # flat indices (into one input's feature) of the masked elements
    trigger_signs: list  # +1 / -1 per masked element
    response_index: list  # flat indices of the response elements
    response_signs: list  # +1 / -1 per response element
    response_scale: float = 1.0  # clean feature scale (std) of the response layer


@dataclass
class WatermarkKey:
    subpaths: list  # of Subpath
    lazy_layers: list  # the lazy layers the subpaths were drawn from, in forward order
    latent_size: int  # latent height = width the feature indices refer to
    feature_sizes: dict  # {layer: elements of one input's feature}
    rs_threshold: float  # a trial passes when its RS reaches this
    model_fingerprint: str = ""  # core.model.prior.base_fingerprint of the watermarked model
    lazy_scores: dict = field(default_factory=dict)  # {layer: laziness score of the probes} (for the record)
    config: dict = field(default_factory=dict)  # the WatermarkConfig it was embedded with
    output_drift: dict = field(default_factory=dict)  # {layer: output-drift score of the probes} (for the record)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": KEY_FORMAT, **asdict(self)}
        path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> WatermarkKey:
        path = Path(path)
        doc = read_key_document(path, KEY_FORMAT, "an AIAO watermark key")
        try:
            subs = [Subpath(**s) for s in doc["subpaths"]]
            key = cls(
                subs,
                list(doc["lazy_layers"]),
                int(doc["latent_size"]),
                dict(doc["feature_sizes"]),
                float(doc["rs_threshold"]),
                str(doc.get("model_fingerprint", "")),
                dict(doc.get("lazy_scores", {})),
                dict(doc.get("config", {})),
                dict(doc.get("output_drift", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise KeyFileError(f"{path}: malformed key ({type(e).__name__}: {e})") from e
        key.check()
        return key

    def check(self) -> None:
        """Internal consistency (indices in range, one sign per index, signs +-1)."""
        if not self.subpaths:
            raise KeyFileError("the key has no subpaths")
        for i, s in enumerate(self.subpaths):
            for layer, idx, signs in (
                (s.trigger_layer, s.trigger_index, s.trigger_signs),
                (s.response_layer, s.response_index, s.response_signs),
            ):
                size = self.feature_sizes.get(layer)
                if size is None:
                    raise KeyFileError(f"subpath {i}: no feature size for layer {layer!r}")
                if len(idx) != len(signs) or not idx:
                    raise KeyFileError(f"subpath {i}, {layer}: {len(idx)} indices but {len(signs)} signs")
                if min(idx) < 0 or max(idx) >= size or any(v not in (1, -1) for v in signs):
                    raise KeyFileError(f"subpath {i}, {layer}: indices outside 0..{size - 1} or signs other than +-1")

    def check_model(self, unet) -> None:
        """The key's layers exist in ``unet`` with the feature sizes the key was made for."""
        mods = dict(unet.named_modules())
        missing = sorted({l for s in self.subpaths for l in (s.trigger_layer, s.response_layer)} - set(mods))
        if missing:
            raise KeyFileError(f"this model has no layer {missing[0]!r}: the key was made for another architecture")
        if unet.config.sample_size != self.latent_size:
            raise KeyFileError(
                f"the key is for {self.latent_size}x{self.latent_size} latents, this model uses "
                f"{unet.config.sample_size}"
            )


def rs_threshold(n: int, alpha: float = TRIAL_ALPHA) -> float:
    """Smallest share k/n with P(Binomial(n, 1/2) >= k) <= alpha."""
    from scipy.stats import binom

    for k in range(n + 1):
        if binom.sf(k - 1, n, 0.5) <= alpha:
            return k / n
    return 1.0


# 3. layers and features ------------------------------------------------------------------------


def candidate_layers(unet) -> list[str]:
    """Linear / Conv2d modules of the UNet whose output depends on the image, in forward order."""
    from core.layers.change import forward_order, layer_kind

    names = [
        n
        for n, m in unet.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        and layer_kind(n) not in IMAGE_FREE_KINDS
        and not n.endswith(("attn2.to_k", "attn2.to_v"))
    ]
    return forward_order(names)


def unet_inputs(unet, n: int, emb: torch.Tensor, generator: torch.Generator):
    """``n`` verification inputs: latents ~ N(0, I), timesteps uniform over training, the prompt embedding."""
    c, s = unet.config.in_channels, unet.config.sample_size
    x = torch.randn((n, c, s, s), generator=generator)
    t = torch.randint(0, 1000, (n,), generator=generator)
    return x, t, emb.expand(n, -1, -1)


@torch.no_grad()
def feature_stats(unet, layers, x, t, emb) -> tuple[dict, dict]:
    """({layer: elements of one input's feature}, {layer: std of its feature}) on a clean forward."""
    out = {}
    with record_features(unet, layers, out):
        unet(x, t, emb)
    return (
        {n: int(v[0].numel()) for n, v in out.items()},
        {n: float(v.float().std().clamp_min(1e-8)) for n, v in out.items()},
    )


@contextlib.contextmanager
def forward_hooks(unet, hooks: dict):
    """Register ``hooks[name]`` as a forward hook of each named module for the ``with`` block."""
    mods = dict(unet.named_modules())
    handles = [mods[name].register_forward_hook(hook) for name, hook in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record_features(unet, layers, store: dict):
    """Forward hooks that put each layer's output (batch x elements) in ``store``."""

    def recorder(name):
        def hook(_m, _i, out):
            store[name] = out.reshape(out.shape[0], -1)

        return hook

    with forward_hooks(unet, {name: recorder(name) for name in set(layers)}):
        yield store


class _Stop(Exception):
    """Raised by a hook to end a forward early (everything needed has been recorded)."""


@contextlib.contextmanager
def triggered(unet, subpaths: list, rows: list[int], store: dict, stop_early: bool = True):
    """Apply the trigger of subpath ``subpaths[rows[b]]`` to input b of the batch, and record every
    response layer's output (batch x elements) in ``store``. With ``stop_early`` the forward is cut
    short (:class:`_Stop`, caught by :func:`run_until`) once every response layer has run."""
    by_layer: dict[str, list] = {}
    for b, j in enumerate(rows):
        by_layer.setdefault(subpaths[j].trigger_layer, []).append((b, j))
    responses = {subpaths[j].response_layer for j in rows}
    masks = {
        j: (torch.as_tensor(subpaths[j].trigger_index), torch.as_tensor(subpaths[j].trigger_signs, dtype=torch.float32))
        for j in set(rows)
    }

    def hook_of(name):
        def hook(_m, _i, out):
            flat = out.reshape(out.shape[0], -1)
            if name in by_layer:
                flat = flat.clone()
                for b, j in by_layer[name]:
                    idx, s = masks[j]
                    idx, s = idx.to(flat.device), s.to(flat.device, flat.dtype)
                    flat[b, idx] = s * flat[b, idx].abs()  # x -> m*s*|x| + (1-m)*x
            if name in responses:
                store[name] = flat
                if stop_early and responses <= set(store):
                    raise _Stop
            return flat.view_as(out) if name in by_layer else None

        return hook

    with forward_hooks(unet, {name: hook_of(name) for name in set(by_layer) | responses}):
        yield store


def run_until(unet, x, t, emb, ctx) -> None:
    """Forward that may be cut short by a hook raising :class:`_Stop`."""
    with ctx:
        try:
            unet(x, t, emb)
        except _Stop:
            pass


# 4. lazy layers and subpaths -------------------------------------------------------------------


def laziness_scores(probes: list[dict[str, float]], layers: list[str]) -> dict[str, float]:
    """Each layer's worst (largest) rank share over the probes: the share of layers that moved strictly
    less than it ({layer: relative change} per probe; a layer a probe did not touch moved 0)."""
    scores = {}
    for name in layers:
        worst = 0.0
        for rel in probes:
            v = rel.get(name, 0.0)
            worst = max(worst, sum(rel.get(o, 0.0) < v for o in layers) / len(layers))
        scores[name] = worst
    return scores


class LazyLayers(NamedTuple):
    """What the probe fine-tunes found (:func:`choose_lazy_layers`)."""

    layers: list  # the lazy layers, forward order
    scores: dict  # {layer: laziness score (weights) of the probes}, every candidate layer
    output_drift: dict  # {layer: output-drift score (features) of the probes}, every candidate layer


def choose_lazy_layers(pipe, photos, cfg: WatermarkConfig, should_stop=never):
    """Generator: the probe fine-tunes on ``photos`` (public faces, 3-10), then ``Done(LazyLayers)``."""
    from core.finetune.full import full_finetune
    from core.finetune.lora import FinetuneConfig, encode_prompt, finetune, pipeline_with_lora
    from core.layers.change import base_state, full_layer_change, lora_layer_change
    from core.model.prompts import CLASS_PROMPT

    layers = candidate_layers(pipe.unet)
    yield Message(f"probe 1/2: the default LoRA recipe, {cfg.probe_steps} steps")
    lcfg = FinetuneConfig(steps=cfg.probe_steps, seed=cfg.seed, checkpoint_every=0, preview_n=0)
    lora = None
    for ev in finetune(pipe, photos, lcfg, should_stop):
        if isinstance(ev, Progress):
            yield Progress("probe: LoRA", ev.step, ev.total, ev.elapsed)
        elif isinstance(ev, Done):
            lora = ev.result.lora
    yield Message(f"probe 2/2: a full fine-tune, {cfg.probe_steps} steps")
    full = None
    for ev in full_finetune(pipe, photos, steps=cfg.probe_steps, seed=cfg.seed, should_stop=should_stop):
        if isinstance(ev, Progress):
            yield Progress("probe: full", ev.step, ev.total, ev.elapsed)
        elif isinstance(ev, Done):
            full = ev.result.state
    if should_stop() or lora is None or full is None:
        yield Done(None, cancelled=True)
        return
    probes = [
        {c.name: c.relative for c in lora_layer_change(pipe, lora, lcfg.alpha)},
        {c.name: c.relative for c in full_layer_change(base_state(pipe), full)},
    ]
    scores = laziness_scores(probes, layers)
    lazy = [n for n in layers if scores[n] < cfg.lazy_fraction]
    if len(lazy) < 2:
        raise ValueError(f"only {len(lazy)} lazy layer(s) at lazy_fraction {cfg.lazy_fraction}: raise it")
    full_unet = copy.deepcopy(pipe.unet)
    full_unet.load_state_dict(full)
    with torch.no_grad():
        emb = encode_prompt(pipe, CLASS_PROMPT).float()
    x, t, e = unet_inputs(pipe.unet, 16, emb, torch.Generator().manual_seed(cfg.seed))
    output_drift = laziness_scores(
        [
            feature_drift(pipe.unet, moved, layers, x, t, e)
            for moved in (pipeline_with_lora(pipe, lora).unet, full_unet)
        ],
        layers,
    )
    yield Message(f"{len(lazy)} lazy layers of {len(layers)}: " + ", ".join(lazy))
    yield Done(LazyLayers(lazy, scores, output_drift))


@torch.no_grad()
def feature_drift(clean, moved, layers: list[str], x, t, emb) -> dict[str, float]:
    """{layer: std(moved output - clean output) / std(clean output)} on the same inputs: how far a
    fine-tune moved what each layer emits (its own weights and everything before it)."""
    dev, dtype = next(clean.parameters()).device, next(clean.parameters()).dtype
    args = (x.to(dev, dtype), t.to(dev), emb.to(dev, dtype))
    ref: dict = {}
    got: dict = {}
    with record_features(clean, layers, ref):
        clean(*args)
    with record_features(moved, layers, got):
        moved(*args)
    return {n: float((got[n].float() - ref[n].float()).std() / ref[n].float().std().clamp_min(1e-8)) for n in layers}


def is_encoder_side(layer: str) -> bool:
    """Whether a UNet layer runs before the decoder (up blocks, output conv)."""
    return layer.split(".")[0] in ("conv_in", "time_embedding", "down_blocks", "mid_block")


@torch.no_grad()
def reachable_pairs(unet, layers: list[str], x, t, emb) -> set[tuple[str, str]]:
    """Pairs (a, b) of ``layers`` (forward order) where b's output changes when a's output is perturbed:
    b depends on a, not just runs after it."""
    clean: dict = {}
    with record_features(unet, layers, clean):
        unet(x, t, emb)
    out = set()
    g = torch.Generator().manual_seed(0)
    for i, a in enumerate(layers[:-1]):

        def perturb(_m, _i, o):
            return o + torch.randn(o.shape, generator=g).to(o.device, o.dtype) * o.float().std().clamp_min(1e-3)

        moved: dict = {}
        with forward_hooks(unet, {a: perturb}), record_features(unet, layers[i + 1 :], moved):
            unet(x, t, emb)
        for b in layers[i + 1 :]:
            if (moved[b] - clean[b]).abs().max() > 1e-4 * clean[b].abs().max().clamp_min(1e-8):
                out.add((a, b))
    return out


def sample_subpaths(
    lazy: list[str],
    feature_sizes: dict,
    scales: dict,
    cfg: WatermarkConfig,
    rng: np.random.Generator,
    reachable: set | None = None,
    output_drift: dict | None = None,
) -> list[Subpath]:
    """``cfg.n_subpaths`` random subpaths: a trigger layer before a response layer, both from ``lazy``
    (in forward order; at most ``cfg.max_gap`` lazy layers apart when it is set; the response before the
    decoder when ``cfg.response_side`` is "encoder"; a pair in ``reachable`` when it is given; the
    response's score in ``output_drift`` below ``cfg.response_fraction`` when it is given),
    with random masks and sign patterns."""
    if len(lazy) < 2:
        raise ValueError(f"a subpath needs 2 lazy layers, got {len(lazy)}")
    pairs = [
        (a, b)
        for a in range(len(lazy))
        for b in range(a + 1, len(lazy))
        if (not cfg.max_gap or b - a <= cfg.max_gap)
        and (cfg.response_side == "any" or is_encoder_side(lazy[b]))
        and (reachable is None or (lazy[a], lazy[b]) in reachable)
        and (
            output_drift is None or cfg.response_fraction >= 1 or output_drift.get(lazy[b], 1.0) < cfg.response_fraction
        )
    ]
    if not pairs:
        raise ValueError(
            f"no trigger/response pair among the lazy layers with max_gap {cfg.max_gap}, "
            f"response_side {cfg.response_side!r}"
            + (" and causal_only" if reachable is not None else "")
            + (f" and response_fraction {cfg.response_fraction}" if output_drift is not None else "")
            + f": {lazy}"
        )
    out = []
    unrestricted = (
        not cfg.max_gap
        and cfg.response_side == "any"
        and reachable is None
        and (output_drift is None or cfg.response_fraction >= 1)
    )
    for _ in range(cfg.n_subpaths):
        # unrestricted: the paper's draw of two lazy layers (the random stream that keys made before the
        # restrictions existed were drawn with, so their embedding commands still rebuild them)
        a, b = sorted(rng.choice(len(lazy), 2, replace=False)) if unrestricted else pairs[rng.integers(len(pairs))]
        ta, rb = lazy[a], lazy[b]
        n_trig = max(1, int(round(cfg.trigger_fraction * feature_sizes[ta])))
        n_resp = min(cfg.response_size, feature_sizes[rb])
        t_idx = np.sort(rng.choice(feature_sizes[ta], n_trig, replace=False))
        r_idx = np.sort(rng.choice(feature_sizes[rb], n_resp, replace=False))
        out.append(
            Subpath(
                ta,
                rb,
                t_idx.tolist(),
                rng.choice([-1, 1], n_trig).tolist(),
                r_idx.tolist(),
                rng.choice([-1, 1], n_resp).tolist(),
                scales[rb],
            )
        )
    return out


# 5. embedding ----------------------------------------------------------------------------------


@dataclass
class EmbedResult:
    unet: object  # the watermarked UNet (a trained copy; the base pipeline is untouched)
    key: WatermarkKey
    losses: list  # per step: {"denoise", "response", "consistency"}
    seconds: float
    verification: object = None  # Verification of the fresh model with its key


def response_hinge(store: dict, subpaths: list, rows: list[int], margin: float) -> torch.Tensor:
    """Mean max(0, margin - s * f / scale) over every response element of every triggered input."""
    losses = []
    for b, j in enumerate(rows):
        sp = subpaths[j]
        f = store[sp.response_layer][b, torch.as_tensor(sp.response_index)]
        s = torch.as_tensor(sp.response_signs, dtype=f.dtype, device=f.device)
        losses.append(torch.relu(margin - s * f / sp.response_scale).mean())
    return torch.stack(losses).mean()


@contextlib.contextmanager
def simulated_finetune(weights: list, drift: float, rank: int, generator: torch.Generator):
    """Move each weight in place by a random rank-``rank`` update of relative norm uniform in
    [0, ``drift``] for the ``with`` block (a stand-in for the unknown downstream fine-tune), then put
    back exactly. Autograd must be done with the moved weights before the block ends."""
    saved = []
    with torch.no_grad():
        for w in weights:
            saved.append(w.detach().clone())
            m = w.reshape(w.shape[0], -1)
            k = min(rank, *m.shape)
            d = torch.randn(m.shape[0], k, generator=generator) @ torch.randn(k, m.shape[1], generator=generator)
            d = d.to(w.device, w.dtype)
            d *= float(torch.rand((), generator=generator)) * drift * m.norm() / d.norm().clamp_min(1e-12)
            w.add_(d.view_as(w))
    try:
        yield
    finally:
        with torch.no_grad():
            for w, w0 in zip(weights, saved):
                w.copy_(w0)


def draw_key(
    clean, lazy: list[str], emb, cfg: WatermarkConfig, rng, g, lazy_scores=None, output_drift=None
) -> WatermarkKey:
    """The secret key: feature sizes and scales of the clean model's lazy layers, then random subpaths."""
    dev = next(clean.parameters()).device
    order = candidate_layers(clean)
    x, t, e = unet_inputs(clean, 16, emb, g)
    sizes, scales = feature_stats(clean, lazy, x.to(dev), t.to(dev), e.to(dev))
    reach = reachable_pairs(clean, lazy, x[:2].to(dev), t[:2].to(dev), e[:2].to(dev)) if cfg.causal_only else None
    subpaths = sample_subpaths(lazy, sizes, scales, cfg, rng, reach, output_drift or None)
    used = sorted({n for s in subpaths for n in (s.trigger_layer, s.response_layer)}, key=order.index)
    return WatermarkKey(
        subpaths,
        lazy,
        clean.config.sample_size,
        {n: sizes[n] for n in used},
        rs_threshold(cfg.response_size),
        lazy_scores=dict(lazy_scores or {}),
        config=asdict(cfg),
        output_drift=dict(output_drift or {}),
    )


def clean_pass_losses(clean, unet, latents, emb, subpaths, resp_layers, den: Denoiser, cfg: WatermarkConfig, g):
    """(denoising loss, consistency loss) on untriggered inputs: the owner's latents, noised."""
    x0 = latents[torch.randint(0, len(latents), (cfg.batch,), generator=g)]
    noised = den.noise(x0, g)
    eb = emb.expand(cfg.batch, -1, -1)
    with torch.no_grad(), record_features(clean, resp_layers, {}) as ref:
        pred_clean = clean(noised.noisy, noised.t, eb).sample.float()
    with record_features(unet, resp_layers, {}) as got:
        pred = unet(noised.noisy, noised.t, eb).sample.float()
    l_con = (pred - pred_clean).pow(2).mean() + torch.stack(
        [
            (
                (got[s.response_layer][:, s.response_index] - ref[s.response_layer][:, s.response_index])
                / s.response_scale
            )
            .pow(2)
            .mean()
            for s in subpaths
        ]
    ).mean()
    return den.errors(pred, noised).mean(), l_con


def triggered_pass_loss(unet, emb, subpaths, drifting, cfg: WatermarkConfig, g) -> torch.Tensor:
    """The response loss on triggered random inputs (under a simulated fine-tune when ``cfg.drift``);
    its gradient is accumulated (at the moved weights, applied to the unmoved)."""
    dev = next(unet.parameters()).device
    rows = torch.randint(0, len(subpaths), (cfg.trigger_batch,), generator=g).tolist()
    xr, tr, er = unet_inputs(unet, cfg.trigger_batch, emb, g)
    store: dict = {}
    with simulated_finetune(drifting, cfg.drift, cfg.drift_rank, g) if cfg.drift else contextlib.nullcontext():
        run_until(unet, xr.to(dev), tr.to(dev), er.to(dev), triggered(unet, subpaths, rows, store))
        l_resp = response_hinge(store, subpaths, rows, cfg.margin)
        (cfg.response_weight * l_resp).backward()
    return l_resp


def embed_watermark(
    pipe,
    latents: torch.Tensor,
    lazy: list[str],
    cfg: WatermarkConfig | None = None,
    should_stop=never,
    lazy_scores: dict | None = None,
    output_drift: dict | None = None,
):
    """Generator: embed the AIAO watermark into a copy of ``pipe.unet`` (``latents``: the owner's clean
    scaled latents for the denoising loss; ``lazy``: the lazy layers, forward order; ``lazy_scores`` /
    ``output_drift``: :class:`LazyLayers`' scores, the latter restricting the response layers). Yields
    ``Progress`` per step and ``Done(EmbedResult)``."""
    from core.finetune.lora import encode_prompt
    from core.model.prompts import CLASS_PROMPT

    cfg = cfg or WatermarkConfig()
    t0 = time.perf_counter()
    dev = pipe.device
    clean = pipe.unet
    order = candidate_layers(clean)
    bad = [n for n in lazy if n not in order]
    if bad:
        raise ValueError(f"not a usable layer of this UNet: {bad[0]!r}")
    lazy = [n for n in order if n in set(lazy)]
    rng = np.random.default_rng(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        emb = encode_prompt(pipe, CLASS_PROMPT).float()

    # 1. the key: feature sizes and scales of the clean model, then random subpaths
    key = draw_key(clean, lazy, emb, cfg, rng, g, lazy_scores, output_drift)
    subpaths = key.subpaths
    used = sorted({l for s in subpaths for l in (s.trigger_layer, s.response_layer)}, key=order.index)
    yield Message(
        f"{len(subpaths)} subpaths over {len(used)} of {len(lazy)} lazy layers; "
        f"a trial passes at RS >= {key.rs_threshold:.3f}"
    )

    # 2. the trainable copy: only the lazy layers learn
    unet = copy.deepcopy(clean).float().requires_grad_(False)
    mods = dict(unet.named_modules())
    params = [p for n in lazy for p in mods[n].parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    den = Denoiser(pipe.scheduler.config)
    resp_layers = sorted({s.response_layer for s in subpaths}, key=order.index)
    drifting = [mods[n].weight for n in order]  # every layer a downstream fine-tune may move
    latents = latents.float().to(dev)

    # 3. steps: denoising + consistency on untriggered inputs, response on triggered ones
    losses = []
    for step in range(1, cfg.steps + 1):
        if should_stop():
            break
        unet.train()
        opt.zero_grad(set_to_none=True)
        l_den, l_con = clean_pass_losses(clean, unet, latents, emb, subpaths, resp_layers, den, cfg, g)
        (cfg.denoise_weight * l_den + cfg.consistency_weight * l_con).backward()
        l_resp = triggered_pass_loss(unet, emb, subpaths, drifting, cfg, g)
        opt.step()
        losses.append(
            {"denoise": float(l_den.detach()), "response": float(l_resp.detach()), "consistency": float(l_con.detach())}
        )
        yield Progress("embed", step, cfg.steps, time.perf_counter() - t0, losses[-1])
    unet.eval().requires_grad_(False)
    if should_stop():
        yield Done(None, cancelled=True)
        return
    result = EmbedResult(unet, key, losses, time.perf_counter() - t0)
    result.verification = verify_unet(unet, key, emb)
    yield Message(f"embedded in {result.seconds:.0f} s; own check: {result.verification.summary()}")
    yield Done(result)


# 5b. shipping a watermarked base as a delta over the clean one ----------------------------------

# 6. verification -------------------------------------------------------------------------------


@dataclass
class Verification:
    vs_rate: float  # share of trials with RS >= threshold
    rs_rate: float  # mean RS over trials
    p_value: float  # P(a model unrelated to the key matches at least this well)
    watermarked: bool  # p_value < alpha
    trials: int
    rs_threshold: float
    alpha: float
    matches: int  # majority-voted response signs that match the key
    total: int  # majority-voted response signs
    per_subpath: list = field(default_factory=list)  # [{"trigger", "response", "rs", "vs"}] per subpath

    def summary(self) -> str:
        verdict = "WATERMARKED" if self.watermarked else "not watermarked"
        return (
            f"{verdict}: VS-rate {self.vs_rate:.1%}, RS-rate {self.rs_rate:.1%} over {self.trials} trials; "
            f"p-value {self.p_value:.3g} (alpha {self.alpha:g}; {self.matches}/{self.total} voted signs match)"
        )


@torch.no_grad()
def verify_unet(unet, key: WatermarkKey, emb: torch.Tensor, cfg: VerifyConfig | None = None) -> Verification:
    """Monte Carlo verification of ``key`` on ``unet`` (``emb``: one prompt embedding, 1 x L x D)."""
    from scipy.stats import binom

    cfg = cfg or VerifyConfig()
    key.check_model(unet)
    dev = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    g = torch.Generator().manual_seed(cfg.seed)
    trials = [(j, i) for j in range(len(key.subpaths)) for i in range(cfg.inputs)]
    signs = {j: [] for j in range(len(key.subpaths))}  # per subpath: inputs x n response signs
    for c in range(0, len(trials), cfg.chunk):
        rows = [j for j, _ in trials[c : c + cfg.chunk]]
        x, t, e = unet_inputs(unet, len(rows), emb.float().cpu(), g)
        store: dict = {}
        run_until(unet, x.to(dev, dtype), t.to(dev), e.to(dev, dtype), triggered(unet, key.subpaths, rows, store))
        for b, j in enumerate(rows):
            sp = key.subpaths[j]
            signs[j].append(torch.sign(store[sp.response_layer][b, torch.as_tensor(sp.response_index)].float()).cpu())
    rs, per, matches, total = [], [], 0, 0
    for j, sp in enumerate(key.subpaths):
        s = torch.stack(signs[j])  # inputs x n
        want = torch.as_tensor(sp.response_signs, dtype=s.dtype)
        r = (s == want).float().mean(dim=1)
        rs.append(r)
        vote = torch.sign(s.sum(dim=0))  # ties -> 0, never equal to the key's sign
        matches += int((vote == want).sum())
        total += len(want)
        per.append(
            {
                "trigger": sp.trigger_layer,
                "response": sp.response_layer,
                "rs": float(r.mean()),
                "vs": float((r >= key.rs_threshold - 1e-9).float().mean()),
            }
        )
    rs = torch.cat(rs)
    p = float(binom.sf(matches - 1, total, 0.5))
    return Verification(
        float((rs >= key.rs_threshold - 1e-9).float().mean()),
        float(rs.mean()),
        p,
        p < cfg.alpha,
        len(rs),
        key.rs_threshold,
        cfg.alpha,
        matches,
        total,
        per,
    )


def verify_watermark(
    pipe, key: WatermarkKey, lora: dict | None = None, cfg: VerifyConfig | None = None, alpha: float | None = None
) -> Verification:
    """Verify ``key`` on ``pipe`` (with ``lora`` merged in, when given: W + (alpha / r) B A)."""
    from core.finetune.lora import encode_prompt, pipeline_with_lora
    from core.model.prompts import CLASS_PROMPT

    view = pipeline_with_lora(pipe, lora, alpha) if lora else pipe
    emb = encode_prompt(view, CLASS_PROMPT)
    return verify_unet(view.unet, key, emb, cfg)
