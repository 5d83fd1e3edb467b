"""Validation of an uploaded LoRA file before anything uses it.

A LoRA file a visitor uploads is untrusted input. The classic danger is pickle: ``.pt`` / ``.bin`` /
``.ckpt`` files are pickles (often inside a zip), and unpickling one runs whatever code its author
put in it. So only ``.safetensors`` is accepted, recognised by its bytes rather than its name, and
this module never calls ``torch.load`` or ``pickle``. A safetensors file is plain data, but its
content can still be hostile or simply wrong: a huge file or header, thousands of tensors, integer
or NaN weights, names that do not exist in the base model, shapes that would fail (or silently
broadcast) when merged, a rank that makes merging expensive, or a LoRA trained for another base
model. :func:`validate_lora_file` checks all of that, cheapest checks first, and either returns a
:class:`ValidatedLoRA` (float32 CPU tensors in the peft naming :func:`core.finetune.lora.load_lora`
returns) or raises :class:`LoRAFileError`, whose message is written for the visitor. The file's
naming (diffusers, peft, kohya-ss / AUTOMATIC1111 with per-layer alpha and rank) is read by
:mod:`core.finetune.formats`, which also refuses adapters other than LoRA and other model families.
"""

from __future__ import annotations

import collections
import json
import math
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.finetune.errors import LoRAFileError  # noqa: F401  (LoRAFileError: the public error type)
from core.finetune.errors import show as _show

MAX_BYTES = 64 * 1024 * 1024  # largest file accepted
MAX_HEADER_BYTES = 16 * 1024 * 1024  # largest safetensors JSON header accepted
MAX_TENSORS = 4096
MAX_RANK = 256
MAX_META_BYTES = 1024 * 1024  # a LoRA's metadata is a few KB; more is refused
MAX_CHANGE = 1e4  # a layer's LoRA change (alpha/r)·B·A may be at most this many times the layer's own size
MAX_STEPS = 100_000  # fine-tuning steps a file may record (leaklab_steps)
DTYPE_BYTES = {
    "F16": 2,
    "BF16": 2,
    "F32": 4,
    "F64": 8,
    "I8": 1,
    "U8": 1,
    "I16": 2,
    "U16": 2,
    "I32": 4,
    "U32": 4,
    "I64": 8,
    "U64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
ALLOWED_DTYPES = ("F16", "BF16", "F32")
COMPONENTS = ("unet", "text_encoder")
PART_NAMES = {"unet": "UNet", "text_encoder": "text encoder"}
SUFFIXES = (".lora_A.weight", ".lora_B.weight")
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80


@dataclass
class ValidatedLoRA:
    lora: dict  # "unet.<module>.lora_A.weight" / "...lora_B.weight" (and "text_encoder...."), CPU float32
    meta: dict  # the file's safetensors metadata (str -> str)
    rank: int  # the rank most layers have
    alpha: float  # merging ``lora`` with this alpha is the file's own merge (per-layer alphas folded into B)
    modules: list[str] = field(default_factory=list)  # UNet module names with a LoRA
    notes: list[str] = field(default_factory=list)  # non-fatal remarks for the visitor
    format: str = "diffusers"  # the file's naming: a key of core.finetune.formats.FORMAT_NAMES
    ranks: dict = field(default_factory=dict)  # "<part>.<module>" -> its rank
    alphas: dict = field(default_factory=dict)  # "<part>.<module>" -> its alpha, as the file gives it
    described: str = "diffusers file"  # the naming in words (e.g. "kohya-ss / AUTOMATIC1111 file with conv layers")


def _the_file(name: str) -> str:
    return f"The file {_show(name)}"


# 1-3. the bytes -------------------------------------------------------------------------------


def _check_size(path: Path) -> int:
    try:
        st = os.stat(path)
    except OSError:
        raise LoRAFileError("missing", "The LoRA file could not be found; please upload it again.") from None
    if not stat.S_ISREG(st.st_mode):
        raise LoRAFileError(
            "missing", f"{_the_file(path.name)} is not a regular file; please upload a .safetensors file."
        )
    if st.st_size == 0:
        raise LoRAFileError("empty", f"{_the_file(path.name)} is empty (0 bytes); expected a .safetensors LoRA file.")
    if st.st_size > MAX_BYTES:
        raise too_large(path.name, st.st_size)
    return st.st_size


def too_large(name: str, size: int) -> LoRAFileError:
    """The refusal of a file over :data:`MAX_BYTES` (also raised before such an upload is read)."""
    return LoRAFileError(
        "too_large", f"{_the_file(name)} is {_size(size)}; LoRA files up to {_size(MAX_BYTES)} are accepted."
    )


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def _header_length(head: bytes, size: int) -> int | None:
    """The safetensors header length if the first bytes look like one (sane length, then '{')."""
    if len(head) < 9:
        return None
    n = struct.unpack("<Q", head[:8])[0]
    if n < 2 or n > MAX_HEADER_BYTES or n > size - 8 or head[8:9] not in (b"{", b"["):  # "[": refused as JSON below
        return None
    return n


def _refuse_pickle(head: bytes, name: str, looks_safetensors: bool) -> None:
    # A safetensors header length can itself start with byte 0x80 (e.g. 640 = 0x280), hence the guard.
    is_zip = head.startswith(ZIP_MAGIC)
    is_pickle = head[:1] == bytes([PICKLE_PROTO]) and not looks_safetensors
    if is_zip or is_pickle:
        kind = "a zip archive (a PyTorch .pt/.bin/.ckpt checkpoint)" if is_zip else "a Python pickle (.pt/.bin/.ckpt)"
        raise LoRAFileError(
            "pickle",
            f"{_the_file(name)} is {kind}. Only .safetensors LoRA files are accepted, because "
            "loading a pickled file can run arbitrary code; please convert it to .safetensors.",
        )


def _check_header(path: Path, size: int) -> None:
    with open(path, "rb") as fh:
        head = fh.read(9)
        n = _header_length(head, size)
        _refuse_pickle(head, path.name, n is not None)
        if n is None:
            raise _not_safetensors(path.name, "its first bytes are not a valid safetensors header")
        fh.seek(8)
        raw = fh.read(n)
    header = _parse_header(raw, path.name)
    _check_table(header, size - 8 - n, path.name)


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise LoRAFileError(
            "not_safetensors",
            f"The file's header names {_show(twice)} twice; each tensor and "
            "setting may appear once. The file was not written by a "
            "safetensors library: export the LoRA again and upload that.",
        )
    return dict(pairs)


def _parse_header(raw: bytes, name: str) -> dict:
    """The JSON header, refused when not an object, nested deeper than any real header (Python's
    parser would hit its recursion limit) or naming a key twice."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise _not_safetensors(name, "its header is nested far deeper than any safetensors header") from None
    except (UnicodeDecodeError, ValueError) as e:
        if isinstance(e, LoRAFileError):
            raise
        raise _not_safetensors(name, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors(name, "its header is not a JSON object")
    return header


def _check_table(header: dict, data_bytes: int, name: str) -> None:
    """Every tensor entry's dtype, shape and byte range agree, lie inside the file and do not overlap
    (checked before safetensors maps anything, so each lie gets its own sentence)."""
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or sum(len(str(k)) + len(str(v)) for k, v in meta.items()) > MAX_META_BYTES:
        raise LoRAFileError(
            "metadata",
            f"{_the_file(name)} carries more than {_size(MAX_META_BYTES)} of metadata "
            "(or metadata that is not text); a LoRA's metadata is a few KB. Export the "
            "LoRA again without it and upload that.",
        )
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("shape"), list)
            or len(entry.get("data_offsets") or []) != 2
        ):
            raise _not_safetensors(name, f"its entry for tensor {_show(key)} is not a tensor description")
        shape, (begin, end) = entry["shape"], entry["data_offsets"]
        if not all(isinstance(d, int) and d >= 0 for d in shape + [begin, end]) or end < begin:
            raise _not_safetensors(
                name, f"tensor {_show(key)} has a shape or byte range that is not made of non-negative whole numbers"
            )
        values = math.prod(shape)
        if end > data_bytes:
            raise _not_safetensors(
                name,
                f"tensor {_show(key)} claims bytes {begin}-{end}, beyond the end of the "
                f"file ({data_bytes} bytes of data): the file is cut short or its header lies",
            )
        width = DTYPE_BYTES.get(str(entry.get("dtype")))
        if width is not None and values * width != end - begin:
            raise _not_safetensors(
                name,
                f"tensor {_show(key)} is declared as {values} values of {entry['dtype']} "
                f"({values * width} bytes) but is given {end - begin} bytes",
            )
        spans.append((begin, end, key))
    spans.sort()
    for (_, e0, k0), (b1, _, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _not_safetensors(name, f"tensors {_show(k0, 40)} and {_show(k1, 40)} share bytes of the file")


def _not_safetensors(name: str, why: str) -> LoRAFileError:
    return LoRAFileError(
        "not_safetensors",
        f"{_the_file(name)} is not a readable .safetensors file: {why}. "
        "Expected a LoRA saved with safetensors (for example by diffusers).",
    )


# 4-5. tensors ---------------------------------------------------------------------------------


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Keys, dtypes and then data through safetensors itself (count and dtype checked before data)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            if len(keys) > MAX_TENSORS:
                raise LoRAFileError(
                    "too_many_tensors",
                    f"{_the_file(path.name)} holds {len(keys)} tensors; a LoRA for "
                    f"this model has far fewer (at most {MAX_TENSORS} accepted).",
                )
            for k in keys:
                dt = f.get_slice(k).get_dtype()
                if dt not in ALLOWED_DTYPES:
                    raise LoRAFileError(
                        "dtype",
                        f"Tensor {_show(k)} is stored as {_show(dt)}; LoRA weights must be "
                        f"floating point ({', '.join(ALLOWED_DTYPES)}).",
                    )
            tensors = {k: f.get_tensor(k) for k in keys}
    except LoRAFileError:
        raise
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise _not_safetensors(path.name, f"safetensors could not open it ({type(e).__name__})") from None
    return tensors, meta


# 6-7. names -----------------------------------------------------------------------------------


def _read_weights(raw: dict[str, torch.Tensor], meta: dict, pipe):
    """The file's LoRA in the internal form of :mod:`core.finetune.formats` (which refuses other adapter
    kinds and model families), its names checked."""
    from core.finetune import formats

    formats.refuse_unreadable(raw, meta, pipe)
    weights = formats.read_lora_state(raw, getattr(pipe, "text_encoder", None))
    _check_names({**weights.peft(), **weights.lone}, weights.unknown)
    return weights


def _check_names(lora: dict[str, torch.Tensor], unknown: list[str]) -> None:
    bad = unknown + [k for k in lora if not k.endswith(SUFFIXES)]
    if len(bad) == len(lora) + len(unknown):
        example = f", found for example {_show(bad[0])}" if bad else ", found no tensors at all"
        raise LoRAFileError(
            "no_lora_keys",
            "The file contains no LoRA weights: expected tensors named like "
            "'unet.<layer>.lora_A.weight' / '...lora_B.weight' (diffusers or peft "
            f"naming){example}.",
        )
    if bad:
        raise LoRAFileError(
            "unknown_module",
            f"Tensor {_show(bad[0])} is not a LoRA weight this app understands: "
            "every tensor must be a lora_A or lora_B weight of a layer of the UNet "
            "or the text encoder.",
        )


def _check_unet_part(lora: dict) -> None:
    """The attacks read the UNet's LoRA layers: a file adapting the text encoder alone has none. (Such a
    file is a real format, e.g. a peft adapter of a text encoder, so it is read; only callers that need
    UNet layers ask for this check.)"""
    if lora and not any(k.startswith("unet.") for k in lora):
        n = len({k.rsplit(".lora_", 1)[0] for k in lora})
        raise LoRAFileError(
            "text_encoder_only",
            f"This LoRA adapts only the text encoder ({n} layers) and no layer "
            "of the UNet; the attacks read what a LoRA changed in the UNet, so "
            "there is nothing for them to read. Upload a LoRA that adapts the "
            "UNet (the Fine-tune tab makes one).",
        )


def _module_name(key: str) -> tuple[str, str]:
    part, rest = key.split(".", 1)
    for suffix in SUFFIXES:
        if rest.endswith(suffix):
            return part, rest[: -len(suffix)]
    raise AssertionError(key)


def _check_modules(lora: dict, pipe) -> dict[tuple[str, str], torch.nn.Module]:
    """{(part, module name): base layer} for every adapted layer, each with both A and B."""
    tables = {p: dict(getattr(pipe, p).named_modules()) for p in COMPONENTS if getattr(pipe, p, None) is not None}
    layers: dict[tuple[str, str], torch.nn.Module] = {}
    for key in lora:
        part, name = _module_name(key)
        mod = tables.get(part, {}).get(name) if name else None
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            raise LoRAFileError(
                "unknown_module",
                f"Tensor {_show(key)} adapts a layer that is not a linear or "
                f"convolution layer of this base model's {PART_NAMES.get(part, part)}; the LoRA was "
                "probably made for a different model architecture. Upload a "
                "LoRA fine-tuned from this app's base model (the Fine-tune tab "
                "makes one).",
            )
        layers[(part, name)] = mod
    for part, name in layers:
        for suffix in SUFFIXES:
            if f"{part}.{name}{suffix}" not in lora:
                raise LoRAFileError(
                    "missing_pair",
                    f"Layer {_show(f'{part}.{name}')} has only one of its two LoRA "
                    f"matrices: {_show(suffix.strip('.'))} is missing; every layer "
                    "needs both lora_A and lora_B. The file is incomplete: export "
                    "the whole LoRA again and upload that.",
                )
    return layers


# 8. shapes ------------------------------------------------------------------------------------


def _expected_shapes(mod: torch.nn.Module, r: int) -> tuple[tuple, tuple]:
    w = mod.weight
    if isinstance(mod, torch.nn.Conv2d):  # A: (r, in / groups, kh, kw) like the conv, B: (out, r, 1, 1)
        return (r, *w.shape[1:]), (w.shape[0], r, 1, 1)
    return (r, w.shape[1]), (w.shape[0], r)


def _check_orientation(lora: dict, layers: dict) -> None:
    """A layer whose lora_A / lora_B are stored transposed or swapped (a converter's slip) is named as
    such, instead of being reported as a rank mismatch."""
    for (part, name), mod in layers.items():
        if not isinstance(mod, torch.nn.Linear):
            continue
        a, b = (tuple(lora[f"{part}.{name}{s}"].shape) for s in SUFFIXES)
        out_f, in_f = mod.weight.shape
        if len(a) != 2 or len(b) != 2 or (a[1] == in_f and b[0] == out_f):
            continue
        transposed = a[0] == in_f and b[1] == out_f and a[1] == b[0]
        swapped = a == (out_f, b[0]) and b == (a[1], in_f)
        if not (transposed or swapped):
            continue
        how = "transposed or swapped" if transposed and swapped else "transposed" if transposed else "swapped"
        raise LoRAFileError(
            "transposed",
            f"The matrices of layer {_show(f'{part}.{name}', 60)} are stored {how}: "
            f"lora_A is {list(a)} where [rank, {in_f}] is expected and lora_B {list(b)} "
            f"where [{out_f}, rank] is; the file was written with A and B the wrong way "
            "round. Export the LoRA again "
            "with diffusers or peft (they store lora_A as [rank, in] and lora_B as "
            "[out, rank]) and upload that.",
        )


def _check_shapes(lora: dict, layers: dict) -> dict[str, int]:
    """{"<part>.<module>": rank}: each layer's rank (a file may give every layer its own, as kohya's
    resized LoRAs do) within 1..MAX_RANK, its A and B shaped for the base layer at that rank."""
    _check_orientation(lora, layers)
    ranks = {}
    for (part, name), mod in layers.items():
        a = lora[f"{part}.{name}.lora_A.weight"]
        r = int(a.shape[0]) if a.ndim else 0
        if r == 0:
            raise LoRAFileError(
                "rank",
                f"The LoRA rank is 0 in layer {_show(f'{part}.{name}', 60)}: its matrices are "
                f"empty, so it changes nothing; ranks from 1 to {MAX_RANK} are accepted. "
                "Export the LoRA again with a rank of at least 1 and upload that.",
            )
        if not 1 <= r <= MAX_RANK:
            raise LoRAFileError(
                "rank",
                f"The LoRA rank is {r} in layer {_show(f'{part}.{name}', 60)}; ranks from 1 "
                f"to {MAX_RANK} are accepted. Upload a LoRA of a smaller rank.",
            )
        want_a, want_b = _expected_shapes(mod, r)
        for suffix, want in ((".lora_A.weight", want_a), (".lora_B.weight", want_b)):
            got = tuple(lora[f"{part}.{name}{suffix}"].shape)
            if got != tuple(want):
                raise LoRAFileError(
                    "shape",
                    f"Tensor {_show(f'{part}.{name}{suffix}')} has shape {list(got)}, but "
                    f"this base model's layer needs {list(want)} at rank {r}; the LoRA does "
                    "not fit this model. Upload a LoRA fine-tuned from this app's base "
                    "model (the Fine-tune tab makes one).",
                )
        ranks[f"{part}.{name}"] = r
    return ranks


# 9-11. values and metadata --------------------------------------------------------------------


def _check_finite(lora: dict) -> None:
    for k, v in lora.items():
        if not torch.isfinite(v).all():
            raise LoRAFileError(
                "non_finite",
                f"Tensor {_show(k)} contains NaN or infinite values; all LoRA weights must be finite numbers.",
            )


def _check_base(meta: dict, pipe, notes: list[str]) -> None:
    from core.model.prior import base_fingerprint

    theirs = meta.get("leaklab_base_fingerprint")
    ours = base_fingerprint(pipe)
    if theirs is None:
        notes.append("no base fingerprint in the file's metadata; its shapes match this base model")
    elif theirs != ours:
        made_for = f" ({_show(meta['leaklab_base_model'])})" if "leaklab_base_model" in meta else ""
        raise LoRAFileError(
            "base_mismatch",
            f"This LoRA was made for a different base model{made_for}: its base "
            f"fingerprint is {_show(theirs, 40)}, this app's base model is "
            f"{ours!r}. Upload a LoRA fine-tuned from this app's base model.",
        )


def _adapter_meta(meta: dict) -> dict:
    text = meta.get("lora_adapter_metadata")
    if text is None:
        return {}
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):  # nested past Python's recursion limit: no adapter config is
        parsed = None
    if not isinstance(parsed, dict):
        raise LoRAFileError(
            "metadata",
            "The file's 'lora_adapter_metadata' entry is not a valid JSON object; "
            "expected the adapter settings diffusers writes (rank, alpha, targets).",
        )
    return parsed


def _alpha(meta: dict, rank: int, notes: list[str]) -> float | None:
    """The file-wide alpha its metadata names, or None when it names none."""
    adapter = _adapter_meta(meta)
    named = [
        (source, value)
        for source, value in (
            ("lora_adapter_metadata", adapter.get("unet.lora_alpha")),
            ("lora_adapter_metadata", adapter.get("text_encoder.lora_alpha")),
            ("leaklab_alpha", meta.get("leaklab_alpha")),
        )
        if value is not None
    ]
    if not named:
        return None
    source, value = named[0]
    try:
        alpha = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        alpha = math.nan
    if not (math.isfinite(alpha) and alpha > 0):
        raise LoRAFileError(
            "alpha", f"The LoRA alpha in the file's {source} is {_show(value, 40)}; expected a positive finite number."
        )
    declared = adapter.get("unet.r")
    if declared is not None and declared != rank:
        notes.append(f"the metadata declares rank {_show(declared, 20)} but the weights have rank {rank}")
    return alpha


def _alphas(meta: dict, weights, ranks: dict[str, int], notes: list[str]) -> tuple[float, dict[str, float]]:
    """(the one alpha to merge the folded LoRA with, every layer's own alpha). A layer's alpha is its own
    (kohya ``.alpha``, peft ``alpha_pattern``), else the file's, else its rank (scale 1)."""
    from core.finetune import formats

    rank = _most_common(ranks)
    own = all(m.alpha is not None for m in weights.modules.values())
    default = None if own else _alpha(meta, rank, notes)
    if default is None and not own:
        same = len(set(ranks.values())) == 1
        notes.append(
            f"no LoRA alpha in the file's metadata; using alpha = rank = {rank}"
            if same
            else "no LoRA alpha in the file's metadata; using alpha = rank for every layer (its own rank)"
        )
    alphas = formats.layer_alphas(weights, default, _adapter_meta(meta))
    return (default if default is not None else formats.common_alpha(alphas)), alphas


def _check_change(lora: dict, layers: dict, ranks: dict[str, int], alphas: dict[str, float]) -> None:
    """The merged change (alpha_l / r_l)·B·A of every layer must stay a finite number of times the layer's
    own size (bounded through ‖B‖·‖A‖ >= ‖B·A‖, in float64): weights like ±3e38 or an alpha of 1e308 pass
    the finiteness check but make the merged model infinite (NaN images, failing linear algebra)."""
    for (part, name), mod in layers.items():
        key = f"{part}.{name}"
        alpha, rank = alphas[key], ranks[key]
        a, b = (lora[f"{key}{s}"].double() for s in SUFFIXES)
        bound = alpha / rank * float(torch.linalg.vector_norm(a)) * float(torch.linalg.vector_norm(b))
        size = float(torch.linalg.vector_norm(mod.weight.detach().double())) or 1.0
        if not math.isfinite(bound) or bound > MAX_CHANGE * size:
            what = "an infinite number of" if not math.isfinite(bound) else f"up to {bound / size:.3g}"
            raise LoRAFileError(
                "too_large_values",
                f"This LoRA would change layer {_show(key, 60)} by "
                f"{what} times its own size (alpha/r · B·A with alpha {alpha:g}, "
                f"rank {rank}); a trained LoRA changes a layer by a fraction of "
                f"it (at most {MAX_CHANGE:g} times is accepted). The file's "
                "weights or alpha are corrupt: export the LoRA again and upload "
                "that.",
            )


def _recorded_steps(meta: dict, notes: list[str]) -> None:
    """A ``leaklab_steps`` that is not a whole number from 1 to MAX_STEPS (2^63, 10^4000 ...) is
    dropped from the metadata with a note: the visitor's own step count is used instead."""
    value = meta.get("leaklab_steps")
    if value is None:
        return
    text = str(value).strip()
    if not (text.isdigit() and len(text) <= 6 and 1 <= int(text) <= MAX_STEPS):
        del meta["leaklab_steps"]
        notes.append(
            f"the file's step count (leaklab_steps = {_show(text, 24)}) is not a whole number from 1 to "
            f"{MAX_STEPS}, so it is ignored and the number of steps you entered is used"
        )


# the entry point ------------------------------------------------------------------------------


def validate_lora_file(path: str | os.PathLike, pipe, need_unet: bool = False) -> ValidatedLoRA:
    """Check an untrusted LoRA file against ``pipe``'s base model; raise :class:`LoRAFileError` if
    anything is wrong, else return its weights (peft naming, CPU float32) and settings. ``need_unet``:
    refuse a file that adapts no UNet layer (the app's attacks and heatmaps read only those)."""
    path = Path(path)
    size = _check_size(path)
    _check_header(path, size)
    raw, meta = _read_tensors(path)
    weights = _read_weights(raw, meta, pipe)
    lora = {k: v.float() for k, v in {**weights.peft(), **weights.lone}.items()}
    if need_unet:
        _check_unet_part(lora)
    layers = _check_modules(lora, pipe)
    ranks = _check_shapes(lora, layers)
    _check_finite(lora)
    notes: list[str] = list(weights.notes)
    _check_base(meta, pipe, notes)
    alpha, alphas = _alphas(meta, weights, ranks, notes)
    _check_change(lora, layers, ranks, alphas)
    _recorded_steps(meta, notes)
    return ValidatedLoRA(
        lora=_folded(weights, alphas, alpha),
        meta=meta,
        rank=_most_common(ranks),
        alpha=alpha,
        modules=sorted(name for part, name in layers if part == "unet"),
        notes=notes,
        format=weights.format,
        ranks=ranks,
        alphas=alphas,
        described=weights.described(),
    )


def _folded(weights, alphas: dict, alpha: float) -> dict:
    from core.finetune.formats import folded

    out = folded(weights, alphas, alpha)
    bad = next((k for k, v in out.items() if not torch.isfinite(v).all()), None)
    if bad is not None:  # per-layer alphas so far from the file's alpha that a folded B overflows float32
        layer = _show(bad.rsplit(".lora_", 1)[0], 60)
        raise LoRAFileError(
            "too_large_values",
            f"The alphas of this LoRA's layers differ from the file's alpha "
            f"({alpha:g}) by so much that layer {layer} cannot be merged in "
            "32-bit floating point. The file's alphas are corrupt: export the "
            "LoRA again and upload that.",
        )
    return out


def _most_common(ranks: dict) -> int:
    return collections.Counter(ranks.values()).most_common(1)[0][0]
