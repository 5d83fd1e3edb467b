"""LoRA files as people share them, read into one form: per adapted layer its down (A), up (B), alpha, rank.

A LoRA changes a layer's weight by dW = (alpha / r) B A. Trainers store the same B, A and alpha under
different names; the ones read here, all through diffusers' own converters (the code its
``load_lora_weights`` runs, so a file reads here exactly as diffusers would load it):

- **diffusers** (this app's exporter, diffusers' training scripts): ``unet.<layer>.lora_A.weight`` /
  ``.lora.down.weight`` / older ``...processor.to_q_lora.down.weight``, the text encoder as
  ``text_encoder.<layer>.lora_linear_layer.down.weight``; alpha in the ``lora_adapter_metadata`` entry
  (``<part>.lora_alpha``, ``<part>.alpha_pattern``) or this app's ``leaklab_alpha``;
- **peft** (``PeftModel.save_pretrained``'s ``adapter_model.safetensors``): ``base_model.model.<layer>.lora_A.weight``,
  one part (UNet or text encoder, told apart by the layer names); its alpha lives in
  ``adapter_config.json``, which is not part of the upload, so alpha = rank is assumed (and said);
- **kohya-ss / AUTOMATIC1111** (sd-scripts, LyCORIS LoCon, most files on model hubs):
  ``lora_unet_<layer_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` and
  ``lora_te_...``: an alpha and a rank of its own per layer, convolution layers (LoCon) with the kernel
  in ``lora_down``. Read with ``StableDiffusionLoraLoaderMixin.lora_state_dict``, which runs diffusers'
  non-diffusers (kohya) conversion and returns the per-layer alphas.

Every name is then brought to the in-memory naming of :mod:`core.finetune.lora` (peft keys with a part
prefix, ``unet.<layer>.lora_A.weight``) with ``convert_unet_state_dict_to_peft`` /
``convert_state_dict_to_diffusers`` + ``convert_state_dict_to_peft``, as diffusers' own loaders do.

Refused, each with a sentence of its own (:func:`refuse_unreadable`): adapters whose change is not
(alpha / r) B A (LyCORIS LoHa, LoKr, (IA)3, OFT, GLoRA, full-difference, CP-decomposed LoCon, DoRA) and
LoRAs for another model family (SDXL, SD 3, FLUX and other transformer models, or SD 1.x / 2.x when the
app runs something else), named from the file's layer names, layer widths or kohya's own metadata.
What fits the running model (layers exist, shapes fit, values finite) is then checked by
:mod:`core.finetune.lora_file`.
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass, field

import torch

from core.finetune.errors import LoRAFileError
from core.finetune.errors import show as _show

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
PEFT_PREFIX = "base_model.model."
COMPONENTS = ("unet", "text_encoder")
UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding")
TEXT_ROOTS = ("text_model", "encoder", "embeddings", "final_layer_norm")
FORMAT_NAMES = {"diffusers": "diffusers", "peft": "peft", "kohya": "kohya-ss / AUTOMATIC1111"}

# adapters whose change to a layer is not (alpha / r) B A: (what to look for in a key, what it is)
OTHER_ADAPTERS = (
    (("hada_w1", "hada_w2", "hada_t1"), "a LyCORIS LoHa (Hadamard-product adapter)"),
    (("lokr_w1", "lokr_w2", "lokr_t2"), "a LyCORIS LoKr (Kronecker-product adapter)"),
    ((".lora_mid",), "a LyCORIS LoCon with CP / Tucker decomposition (it has 'lora_mid' tensors)"),
    ((".on_input",), "an (IA)3 adapter (it rescales activations instead of adding B A)"),
    ((".oft_blocks", ".oft_diag", "boft"), "an OFT / BOFT adapter (orthogonal fine-tuning)"),
    ((".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight"), "a LyCORIS GLoRA adapter"),
    ((".diff", ".diff_b"), "a LyCORIS full-difference file (whole changed weights, not a low-rank pair)"),
    ((".w_norm", ".b_norm"), "a LyCORIS adapter of normalisation layers"),
    (("bundle_emb",), "a LoRA with bundled textual-inversion embeddings (new words for its text encoder)"),
)
DORA_KEYS = ("dora_scale", "lora_magnitude_vector")

# model families named by the layer names a LoRA for them carries
FAMILY_KEYS = (
    (("double_blocks", "single_blocks", "single_transformer_blocks"), "FLUX.1"),
    (("joint_blocks", "context_block"), "Stable Diffusion 3"),
    (("lora_te1_", "lora_te2_", "text_encoder_2.", "add_embedding", "label_emb"), "SDXL"),
    (
        ("lora_transformer_", "transformer.", "diffusion_model."),
        "a transformer (DiT) model such as FLUX, SD 3 or PixArt",
    ),
)
# ... by the width of the text features the UNet's cross-attention reads (and of the text encoder)
FAMILY_WIDTHS = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "SDXL"}
# ... by what kohya / the SAI model spec write in the metadata
FAMILY_META = (
    ("sdxl", "SDXL"),
    ("stable-diffusion-xl", "SDXL"),
    ("flux", "FLUX.1"),
    ("sd3", "Stable Diffusion 3"),
    ("stable-diffusion-3", "Stable Diffusion 3"),
    ("sd_v2", "Stable Diffusion 2.x"),
    ("stable-diffusion-v2", "Stable Diffusion 2.x"),
    ("sd_v1", "Stable Diffusion 1.x"),
    ("stable-diffusion-v1", "Stable Diffusion 1.x"),
)
RUNNABLE = ("Stable Diffusion 1.x", "Stable Diffusion 2.x")  # families a StableDiffusionPipeline can be


@dataclass(frozen=True)
class ModuleLoRA:
    """One adapted layer: dW = (alpha / rank) up @ down (convolutions flattened)."""

    down: torch.Tensor  # A: r x in (x kh x kw), as stored
    up: torch.Tensor  # B: out x r (x 1 x 1)
    alpha: float | None  # the layer's own alpha when the file stores one (kohya), else None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0]) if self.down.ndim else 0


@dataclass
class LoRAWeights:
    """A LoRA file read into one form, whatever its naming."""

    modules: dict[str, ModuleLoRA]  # "unet.<layer>" / "text_encoder.<layer>" -> its pair
    format: str  # a key of FORMAT_NAMES
    unknown: list[str] = field(default_factory=list)  # tensor names no reader understood (the caller refuses)
    lone: dict[str, torch.Tensor] = field(default_factory=dict)  # peft-named halves without their other half
    notes: list[str] = field(default_factory=list)

    def peft(self) -> dict[str, torch.Tensor]:
        """The pairs as a peft-named state dict (``unet.<layer>.lora_A.weight`` ...), as stored."""
        out = {}
        for key, m in self.modules.items():
            out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = m.down, m.up
        return out

    @property
    def has_conv_kernels(self) -> bool:
        """True when some down matrix carries a spatial kernel larger than 1x1 (kohya's LoCon)."""
        return any(m.down.ndim == 4 and m.down.shape[-1] * m.down.shape[-2] > 1 for m in self.modules.values())

    def described(self) -> str:
        name = FORMAT_NAMES[self.format]
        return name + " file" + (" with convolution layers (LoCon)" if self.has_conv_kernels else "")


# 1. what cannot be read ------------------------------------------------------------------------


def refuse_unreadable(raw: dict[str, torch.Tensor], meta: dict, pipe=None) -> None:
    """Raise :class:`LoRAFileError` for an adapter kind other than LoRA, for DoRA, and for a LoRA of a
    model family other than ``pipe``'s (``pipe`` None: only families this app can never run)."""
    keys = list(raw)
    dora = next((k for k in keys if any(d in k for d in DORA_KEYS)), None)
    if dora is not None:
        which = next(d for d in DORA_KEYS if d in dora)
        raise LoRAFileError(
            "dora",
            f"This file is a DoRA (weight-decomposed LoRA: it stores a magnitude vector per "
            f"layer, '{which}', for example {_show(dora)}), so its change to a layer is not the plain "
            "(alpha / r) B A this app reads. Export it as a plain LoRA (trained without DoRA) "
            "and upload that.",
        )
    for marks, what in OTHER_ADAPTERS:
        hit = next((k for k in keys if any(_has_mark(k, m) for m in marks)), None)
        if hit is not None:
            reason = "lycoris" if "LyCORIS" in what else "other_adapter"
            raise LoRAFileError(
                reason,
                f"This file is {what} (for example tensor {_show(hit)}), which this app does "
                "not read: it reads plain LoRA files (down/up pairs with an alpha per layer, "
                "LoCon convolution layers included). Upload a plain LoRA, or convert this one "
                "to a plain LoRA first.",
            )
    family = file_family(raw, meta)
    ours = pipe_family(pipe) if pipe is not None else None
    if family is not None and family not in RUNNABLE:
        raise LoRAFileError(
            "other_family",
            f"This LoRA was made for {family}, a different kind of model than the "
            "Stable Diffusion 1.x-style models this app runs; it cannot be read here. "
            "Upload a LoRA made for this app's base model.",
        )
    if family is not None and pipe is not None and family != ours:
        raise LoRAFileError(
            "other_family",
            f"This LoRA was made for {family}; this app is running "
            f"{ours}, so its layers do not fit. Upload a LoRA made for {ours}"
            + (
                ""
                if ours in RUNNABLE
                else ", or start the app on a GPU with an SD 1.x "
                "base (python app.py --model <model id>) to read SD 1.x LoRAs"
            )
            + ".",
        )


def _has_mark(key: str, mark: str) -> bool:
    """``mark`` in ``key`` as a whole name part (followed by the end, "." or "_")."""
    return re.search(re.escape(mark) + r"($|[._])", key) is not None


def file_family(raw: dict[str, torch.Tensor], meta: dict | None = None) -> str | None:
    """The model family a LoRA file names (layer names first, then the width of its cross-attention
    and text-encoder inputs, then kohya's / the model spec's metadata), or None when it names none."""
    for marks, family in FAMILY_KEYS:
        if any(k.startswith(m) or f".{m}" in k or f"_{m}" in k for k in raw for m in marks):
            return family
    for width in _text_widths(raw):
        if width in FAMILY_WIDTHS:
            return FAMILY_WIDTHS[width]
    # the metadata only names families this app cannot run: between SD 1.x and 2.x the shapes decide
    meta = meta or {}
    text = " ".join(str(meta.get(k, "")) for k in ("ss_base_model_version", "modelspec.architecture")).lower()
    family = next((family for mark, family in FAMILY_META if mark in text), None)
    return family if family not in RUNNABLE else None


def _text_widths(raw: dict[str, torch.Tensor]) -> list[int]:
    """Input widths of the layers that read text features: the UNet's cross-attention keys / values."""
    out = []
    for k, v in raw.items():
        flat = k.replace("_", ".")
        if ".attn2." in flat and re.search(r"\.to\.?[kv]\.", flat) and ("down" in k or "lora_A" in k) and v.ndim == 2:
            out.append(int(v.shape[1]))
    return sorted(set(out))


def pipe_family(pipe) -> str:
    """What the running model is, in words: a known family by its cross-attention width and layout, else its name."""
    cfg = pipe.unet.config
    width = cfg.cross_attention_dim
    sd_layout = tuple(cfg.block_out_channels) == (320, 640, 1280, 1280)
    if sd_layout and width in FAMILY_WIDTHS:
        return FAMILY_WIDTHS[width]
    from core.model.pipeline import DEFAULT_BASE

    name = str(getattr(pipe.config, "_name_or_path", "") or "")
    return "this app's embedded miniature model" if name in ("", str(DEFAULT_BASE)) else f"the model {_show(name, 60)}"


# 2. names --------------------------------------------------------------------------------------


def file_format(keys) -> str:
    keys = list(keys)
    if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if keys and all(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    return "diffusers"


def read_lora_state(raw: dict[str, torch.Tensor], text_encoder=None) -> LoRAWeights:
    """The file's tensors (already checked for size and dtype) in the internal form. ``text_encoder``:
    the running model's, whose layer names decide whether a ``text_model.`` prefix is dropped (recent
    transformers flattened CLIPTextModel; files keep the old names), as diffusers' loader does."""
    fmt = file_format(raw)
    alphas: dict[str, float] = {}
    if fmt == "kohya":
        parts, alphas, unknown = _kohya_parts(raw)
    else:
        parts, unknown = _split_parts({k[len(PEFT_PREFIX) :] if fmt == "peft" else k: v for k, v in raw.items()})
    flat = text_encoder is not None and not hasattr(text_encoder, "text_model")
    peft, left = {}, list(unknown)
    for part, sub in parts.items():
        conv, bad = _to_peft(part, sub)
        left += [f"{part}.{k}" for k in bad]
        peft.update({f"{part}.{_drop_text_model(k, part, flat)}": v for k, v in conv.items()})
    modules, lone = _pairs(
        peft, {_drop_text_model(k, k.split(".", 1)[0], flat, prefixed=True): a for k, a in alphas.items()}
    )
    notes = (
        ["a peft adapter file: peft keeps its alpha in adapter_config.json, which is not part of the upload"]
        if fmt == "peft"
        else []
    )
    return LoRAWeights(modules, fmt, left, lone=lone, notes=notes)


def _drop_text_model(key: str, part: str, flat: bool, prefixed: bool = False) -> str:
    if not (flat and part == "text_encoder"):
        return key
    head = "text_encoder." if prefixed else ""
    return head + key[len(head) :].removeprefix("text_model.")


def _split_parts(raw: dict) -> tuple[dict[str, dict], list[str]]:
    """{part: {name without prefix: tensor}} by the "unet." / "text_encoder." prefix, or (files without
    one: peft, old diffusers) by the first segment of the layer name."""
    parts: dict[str, dict] = {}
    unknown = []
    for k, v in raw.items():
        head, _, rest = k.partition(".")
        if head in COMPONENTS and rest:
            parts.setdefault(head, {})[rest] = v
        elif head in UNET_ROOTS:
            parts.setdefault("unet", {})[k] = v
        elif head in TEXT_ROOTS:
            parts.setdefault("text_encoder", {})[k] = v
        else:
            unknown.append(k)
    return parts, unknown


def _kohya_parts(raw: dict) -> tuple[dict[str, dict], dict[str, float], list[str]]:
    """diffusers' reading of a kohya file: ({part: {diffusers name: tensor}}, {"<part>.<layer>": alpha},
    names it could not convert)."""
    from diffusers import StableDiffusionPipeline

    _check_kohya_pairs(raw)
    try:
        sd, alphas = StableDiffusionPipeline.lora_state_dict(dict(raw))
    except ValueError:  # diffusers names the keys it could not convert; all of them are refused below
        return {}, {}, list(raw)
    parts, unknown = _split_parts(sd)
    return parts, {_alpha_layer(k): float(v) for k, v in (alphas or {}).items()}, unknown


def _check_kohya_pairs(raw: dict) -> None:
    for k in raw:
        for have, need in ((".lora_down.weight", ".lora_up.weight"), (".lora_up.weight", ".lora_down.weight")):
            if k.endswith(have) and k[: -len(have)] + need not in raw:
                raise LoRAFileError(
                    "missing_pair",
                    f"Layer {_show(k[: -len(have)])} has only one of its two LoRA "
                    f"matrices: {_show(need.strip('.'))} is missing; every layer needs "
                    "both lora_down and lora_up. The file is incomplete: export the "
                    "whole LoRA again and upload that.",
                )


def _alpha_layer(key: str) -> str:
    """diffusers' name of a kohya alpha ("unet.<...>.processor.to_q_lora.down.weight.alpha",
    "unet.<layer>.alpha") -> "unet.<layer>" in peft naming (through the same converters as the weights)."""
    part, rest = key.removesuffix(".alpha").split(".", 1)
    if not rest.endswith(".down.weight"):
        rest += ".lora.down.weight"
    conv, _ = _to_peft(part, {rest: None})
    return f"{part}.{next(iter(conv)).removesuffix('.lora_A.weight')}" if conv else key


def _to_peft(part: str, sub: dict) -> tuple[dict, list[str]]:
    """One part's names converted to peft naming as diffusers' loaders do (UNet: ``convert_unet_state_dict_to_peft``;
    text encoder: ``convert_state_dict_to_diffusers`` then ``convert_state_dict_to_peft``), and the names
    it could not place."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from diffusers.utils.state_dict_utils import StateDictType

    if part == "unet":
        conv = convert_unet_state_dict_to_peft(sub)
    elif all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sub):
        conv = dict(sub)  # already peft naming (diffusers cannot infer a naming from MLP-only peft keys)
    else:
        try:
            conv = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sub))
        except ValueError:  # diffusers infers the naming from q/k/v/out keys; kohya files with only some of them
            if not any("_lora.down" in k or "lora_linear_layer" in k for k in sub):
                return {}, list(sub)
            conv = convert_state_dict_to_peft(sub, original_type=StateDictType.DIFFUSERS_OLD)
    if len(conv) != len(sub):
        raise LoRAFileError(
            "duplicate_key",
            f"Two tensors of the {part} part map to the same LoRA weight; each adapted layer must appear once.",
        )
    bad = [k for k, new in zip(sub, conv) if not new.endswith((".lora_A.weight", ".lora_B.weight"))]
    return {k: v for k, v in conv.items() if k.endswith((".lora_A.weight", ".lora_B.weight"))}, bad


def _pairs(peft: dict, alphas: dict) -> tuple[dict[str, ModuleLoRA], dict[str, torch.Tensor]]:
    """({"<part>.<layer>": ModuleLoRA}, {name: tensor} of lone halves). A lone half is left to the
    caller's missing-pair check, which names the missing matrix."""
    modules = {}
    for k, v in peft.items():
        layer = k.removesuffix(".lora_A.weight")
        b = peft.get(f"{layer}.lora_B.weight")
        if k.endswith(".lora_A.weight") and b is not None:
            modules[layer] = ModuleLoRA(v, b, alphas.get(layer))
    stray = {k: v for k, v in peft.items() if k.rsplit(".lora_", 1)[0] not in modules}
    lost = [k for k in alphas if k not in modules]
    if lost:
        raise LoRAFileError(
            "alpha",
            f"The file stores an alpha for {_show(lost[0])}, a layer without LoRA weights; "
            "the file is inconsistent: export the LoRA again and upload that.",
        )
    return modules, stray


# 3. alphas -------------------------------------------------------------------------------------


def alpha_pattern(adapter: dict, part: str) -> dict[str, float]:
    """peft's per-layer alphas from diffusers' ``lora_adapter_metadata`` (``<part>.alpha_pattern``:
    layer name or name suffix -> alpha; a leading ``^`` anchors it)."""
    pattern = adapter.get(f"{part}.alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise LoRAFileError("metadata", f"The file's {part}.alpha_pattern is not a JSON object of layer -> alpha.")
    return {str(k): v for k, v in pattern.items()}


def layer_alphas(weights: LoRAWeights, default: float | None, adapter: dict | None = None) -> dict[str, float]:
    """The alpha of every layer: its own (kohya ``.alpha``, peft ``alpha_pattern``), else ``default``
    (the file's alpha), else its rank (alpha = rank: scale 1, the diffusers / peft convention)."""
    adapter = adapter or {}
    out = {}
    for key, m in weights.modules.items():
        part, layer = key.split(".", 1)
        own = m.alpha
        for pat, value in alpha_pattern(adapter, part).items():
            if own is None and (layer == pat.lstrip("^") or layer.endswith("." + pat.lstrip("^"))):
                own = value
        out[key] = _positive(own if own is not None else default if default is not None else m.rank, key)
    return out


def _positive(value, key: str) -> float:
    try:
        a = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        a = float("nan")
    if not (math.isfinite(a) and a > 0):
        raise LoRAFileError(
            "alpha", f"The LoRA alpha of layer {_show(key)} is {_show(value, 40)}; expected a positive finite number."
        )
    return a


def common_alpha(alphas: dict[str, float]) -> float:
    """The alpha most layers share (what a single-alpha reader would use)."""
    return collections.Counter(alphas.values()).most_common(1)[0][0] if alphas else 1.0


def folded(weights: LoRAWeights, alphas: dict[str, float], alpha: float) -> dict[str, torch.Tensor]:
    """A peft-named state dict (float32) whose merge with the single ``alpha`` is the file's own merge:
    each layer's up is scaled by alpha_layer / alpha, so (alpha / r) B' A = (alpha_layer / r) B A for
    any per-layer rank. Layers at ``alpha`` keep their tensors as stored (values unchanged)."""
    out = {}
    for key, m in weights.modules.items():
        f = alphas[key] / alpha
        up = m.up.float()
        out[f"{key}.lora_A.weight"] = m.down.float()
        out[f"{key}.lora_B.weight"] = up if f == 1.0 else up * f
    return out
