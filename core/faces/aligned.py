"""Aligned crops of data-set photos (LFW, UTKFace), exactly as a visitor's upload is aligned.

Every photo a model trains on or is scored against goes through :func:`core.faces.ingest.align_face`
at the model's resolution. Alignment runs dlib's detector and landmarks (~35 ms a photo), so crops
are cached on disk (``$LEAKLAB_CACHE`` or ``~/.cache/lora-leak-lab``, ``aligned/<size>-<template>/``)
as RGBA PNGs: RGB is the crop, alpha marks the pixels that lie inside the photo.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from core.faces import data, ingest


def cache_root() -> Path:
    return Path(os.environ.get("LEAKLAB_CACHE") or Path.home() / ".cache" / "lora-leak-lab")


def _folder(size: int, template: np.ndarray) -> Path:
    tag = hashlib.sha256(np.ascontiguousarray(template, dtype=np.float64).tobytes()).hexdigest()[:12]
    return cache_root() / "aligned" / f"{size}-{tag}"


def _key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]


def align_file(
    path: str | Path, size: int = data.IMAGE_SIZE, template: np.ndarray | None = None
) -> ingest.Aligned | None:
    """The aligned crop of one photo file (cached), or None where dlib finds no face."""
    path = Path(path)
    template = ingest.load_template() if template is None else template
    folder = _folder(size, template)
    f = folder / f"{_key(path)}.png"
    if f.exists():
        a = np.asarray(Image.open(f))
        if a.ndim == 2:  # the "no face" marker: a 1x1 grey image
            return None
        return ingest.Aligned(np.ascontiguousarray(a[..., :3]), a[..., 3] > 127)
    img = ingest.open_image(path)
    rect, pts, _ = ingest.find_face(img)
    out = None if rect is None else ingest.align_face(img, pts, template, size)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".{os.getpid()}.tmp")
    if out is None:
        Image.new("L", (1, 1), 127).save(tmp, format="PNG")
    else:
        Image.fromarray(np.dstack([out.crop, out.inside.astype(np.uint8) * 255])).save(tmp, format="PNG")
    os.replace(tmp, f)
    return out


def load_crops(paths, size: int = data.IMAGE_SIZE) -> np.ndarray:
    """Aligned crops (uint8 N x size x size x 3) of LFW-layout photos; a photo where dlib finds no
    face (rare in LFW) gets the fixed central crop of :func:`core.faces.data.crop_face` instead."""
    out = []
    for p in paths:
        a = align_file(p, size)
        out.append(a.crop if a is not None else data.fixed_crop(p, size))
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def load_set(paths, size: int = data.IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Aligned crops, inside masks (bool N x size x size) and the indices of ``paths`` kept: photos
    where dlib finds no face are skipped (the caller counts them)."""
    crops, masks, kept = [], [], []
    for i, p in enumerate(paths):
        a = align_file(p, size)
        if a is not None:
            crops.append(a.crop)
            masks.append(a.inside)
            kept.append(i)
    if not crops:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), bool), []
    return np.stack(crops), np.stack(masks), kept
