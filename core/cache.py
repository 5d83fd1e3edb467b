"""Results cached by content: a JSON file under the cache dir named by a hash of everything the result
depends on (weights, photos, settings), so a rerun of a long study measures only what changed.
Used by the watermark and defenses studies."""

from __future__ import annotations

import hashlib
import json
import os
import threading

import numpy as np
import torch


def _has_data(p) -> bool:
    if isinstance(p, (np.ndarray, torch.Tensor)):
        return True
    if isinstance(p, dict):
        return any(_has_data(v) for v in p.values())
    return isinstance(p, (list, tuple)) and any(_has_data(v) for v in p)


def _feed(h, p) -> None:
    if isinstance(p, torch.Tensor):  # shape and dtype too: zeros(2, 3) and zeros(3, 2) have the same bytes
        t = p.detach().cpu().contiguous()
        h.update(f"tensor{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(p, np.ndarray):
        h.update(f"array{p.shape}{p.dtype.str}".encode())
        h.update(np.ascontiguousarray(p).tobytes())
    elif isinstance(p, dict) and _has_data(p):
        for k in sorted(p):
            h.update(str(k).encode())
            _feed(h, p[k])
    elif isinstance(p, (list, tuple)) and _has_data(p):
        for v in p:
            _feed(h, v)
    else:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())


def digest(*parts) -> str:
    """A hash of ``parts``: arrays and tensors by their bytes (also inside lists and dicts), everything
    else by its JSON text."""
    h = hashlib.sha256()
    for p in parts:
        _feed(h, p)
    return h.hexdigest()[:32]


def cached(folder: str, parts, compute):
    """``compute()`` (a JSON-able dict), stored in ``<cache dir>/<folder>`` under ``digest(*parts)``.
    Written atomically (a temp file, then a rename); an unreadable entry (e.g. a file truncated by a
    crash of an older version) is recomputed, not fatal."""
    from core.model.prior import cache_dir

    path = cache_dir() / folder / f"{digest(*parts)}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(value, default=float))
    os.replace(tmp, path)
    return value
