"""File formats shared by the watermarks: key documents, and a watermarked base stored as a delta.

A watermarked base ships as what embedding changed (the UNet / text-encoder tensors minus the clean
base's, float16, sharded over 16 MB), loaded over the clean base by :func:`load_delta` after checking
the base's fingerprint; ``watermark.json`` beside the deltas records the exact command and the own
check of each. Both :mod:`core.watermark.aiao` and :mod:`core.watermark.backdoor` use these, so
neither imports the other.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch

from core import ASSETS


class KeyFileError(ValueError):
    """A watermark key file that cannot be used (unreadable, wrong format, or for another model)."""


def read_key_document(path: Path, key_format: str, what: str) -> dict:
    """The JSON object of a key file, checked to carry ``"format": key_format`` (else KeyFileError)."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise KeyFileError(f"no key file at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KeyFileError(f"{path} is not a readable JSON key file: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != key_format:
        raise KeyFileError(f'{path} is not {what} (expected "format": "{key_format}")')
    return doc


def watermarked_pipeline(pipe, unet, text_encoder=None):
    """A pipeline view of ``pipe`` with the watermarked ``unet`` (and ``text_encoder``, when the
    watermark changed it); nothing copied."""
    from core.model.pipeline import private_view

    view = private_view(pipe)
    view.unet = unet
    if text_encoder is not None:
        view.text_encoder = text_encoder
    return view


DELTA_FORMAT = "leaklab-watermark-delta-v1"
DELTA_PARTS = ("unet", "text_encoder")
WATERMARK_DIR = ASSETS / "watermark"
# name -> (delta file, key file) of the watermarked bases shipped with the app
SHIPPED = {"AIAO": ("aiao.safetensors", "aiao_key.json"), "backdoor": ("backdoor.safetensors", "backdoor_key.json")}
RECORD_FILE = "watermark.json"  # the exact commands and own checks of the shipped deltas
SHARD_BYTES = 16_000_000  # a larger delta is written as several files; the first one names the others


def save_delta(clean, marked, path: str | Path, half: bool = True) -> dict:
    """Write what embedding changed: for every UNet / text-encoder tensor of pipeline ``marked`` that
    differs from ``clean``'s, the difference (float16 unless ``half`` is False), keyed
    ``"<part>.<tensor name>"``, with the clean base's fingerprint in the metadata, in shards beside
    ``path`` when it is over ``SHARD_BYTES`` (:func:`write_delta_files`; load ``path``). Returns
    {"tensors", "parameters", "bytes", "files"}."""
    from core.model.prior import base_fingerprint

    out, n = {}, 0
    for part in DELTA_PARTS:
        a, b = getattr(clean, part).state_dict(), getattr(marked, part).state_dict()
        for name, w in b.items():
            d = w.detach().float().cpu() - a[name].detach().float().cpu()
            if torch.count_nonzero(d):
                out[f"{part}.{name}"] = (d.half() if half else d).contiguous()
                n += d.numel()
    if not out:
        raise ValueError("the marked model equals the clean one: nothing to save")
    files = write_delta_files(out, path, {"format": DELTA_FORMAT, "base_fingerprint": base_fingerprint(clean)})
    return {
        "tensors": len(out),
        "parameters": n,
        "bytes": sum(f.stat().st_size for f in files),
        "files": [f.name for f in files],
    }


def write_delta_files(tensors: dict, path: str | Path, metadata: dict, shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write ``tensors`` to ``path``, in shards of at most ``shard_bytes`` (a larger tensor alone) when
    they do not fit in one: ``<stem>-2.safetensors``, ... beside it, listed in the first file's
    metadata (``"shards"``), which is the one to load. Returns the files written."""
    from safetensors.torch import save_file

    groups, size = [{}], 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][k] = t
        size += nbytes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files = [path] + [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(2, len(groups) + 1)]
    for i, (group, f) in enumerate(zip(groups, files)):
        meta = dict(metadata, shards=json.dumps([g.name for g in files[1:]])) if i == 0 and len(files) > 1 else metadata
        save_file(group, str(f), metadata=meta)
    return files


def read_delta_files(path: str | Path) -> tuple[dict, dict]:
    """(metadata of the first file, every tensor of it and of the shards it names). Raises
    :class:`KeyFileError` for a missing, unreadable or foreign file."""
    from safetensors import safe_open

    def read(f: Path):
        if not f.exists():
            raise KeyFileError(f"no watermark delta file at {f}")
        try:
            with safe_open(str(f), framework="pt") as h:
                return h.metadata() or {}, {k: h.get_tensor(k) for k in h.keys()}
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise KeyFileError(f"{f} is not a readable safetensors file: {e}") from e

    path = Path(path)
    meta, tensors = read(path)
    if meta.get("format") != DELTA_FORMAT:
        raise KeyFileError(f"{path} is not a watermark delta (expected format {DELTA_FORMAT!r})")
    try:
        shards = json.loads(meta.get("shards", "[]"))
    except ValueError:
        shards = None
    if not isinstance(shards, list) or not all(isinstance(n, str) and Path(n).name == n for n in shards):
        raise KeyFileError(f"{path}: its list of shards is not a list of file names beside it")
    for name in shards:
        sub_meta, sub = read(path.with_name(name))
        if sub_meta.get("format") != DELTA_FORMAT or sub_meta.get("base_fingerprint") != meta.get("base_fingerprint"):
            raise KeyFileError(f"{path.with_name(name)} is not a shard of {path.name}")
        if set(sub) & set(tensors):
            raise KeyFileError(f"{path.with_name(name)} repeats tensors of {path.name}")
        tensors.update(sub)
    return meta, tensors


def load_delta(clean, path: str | Path, check_base: bool = True):
    """A pipeline view of ``clean`` with the delta file ``path`` added (copies of the parts it changes;
    ``clean`` is not modified). Raises :class:`KeyFileError` for a file that is not a delta or was
    made for another base."""
    from core.model.prior import base_fingerprint

    path = Path(path)
    meta, tensors = read_delta_files(path)
    if check_base and meta.get("base_fingerprint") != base_fingerprint(clean):
        raise KeyFileError(
            f"{path} was made for another base model (fingerprint {meta.get('base_fingerprint')}, "
            f"this one {base_fingerprint(clean)})"
        )
    by_part: dict = {}
    for k, d in tensors.items():
        part, name = k.split(".", 1)
        if part not in DELTA_PARTS:
            raise KeyFileError(f"{path}: unexpected tensor {k!r}")
        by_part.setdefault(part, {})[name] = d
    parts = {}
    for part, deltas in by_part.items():
        module = copy.deepcopy(getattr(clean, part))
        state = module.state_dict()
        bad = [n for n in deltas if n not in state or state[n].shape != deltas[n].shape]
        if bad:
            raise KeyFileError(f"{path}: {part} tensor {bad[0]!r} does not fit this model")
        with torch.no_grad():
            for n, d in deltas.items():
                state[n].add_(d.to(state[n].device, torch.float32).to(state[n].dtype))
        parts[part] = module.eval().requires_grad_(False)
    return watermarked_pipeline(clean, parts.get("unet", clean.unet), parts.get("text_encoder"))


def load_model(model, device=None, delta: str | Path | None = None):
    """A pipeline (:func:`core.model.pipeline.load_pipeline`), with a watermark ``delta`` file added if given."""
    from core.model.pipeline import load_pipeline

    pipe = load_pipeline(model, device)
    return load_delta(pipe, delta) if delta else pipe


def write_record(out: str | Path, name: str, record: dict) -> Path:
    """Add ``record`` under ``name`` to the ``watermark.json`` beside the delta file ``out``."""
    path = Path(out).parent / RECORD_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    doc[name] = record
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def own_check_record(v) -> dict:
    d = asdict(v)
    d.pop("images", None)
    return d
