"""Reading a visitor's uploaded file exactly once, then deleting Gradio's copy.

Gradio saves every upload at ``<upload dir>/<hash of its bytes>/<file name>``, so two visitors who
upload byte-identical files share one path. The app reads an upload into memory and deletes that
copy at once (a visitor's photos never stay in a folder other sessions use). If the second of two such
visitors then found the file gone, their upload would fail for no reason of theirs; so the bytes read
are also kept in this process's memory, keyed by that path, for :data:`RECENT_TTL` seconds, and a
handler that finds the file already deleted gets them from there. Only a visitor who sent exactly
these bytes (under the same file name) is given that path by Gradio, so this hands nobody anything
they did not upload themselves. Nothing is written anywhere, nothing is logged.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

RECENT_TTL = 600.0  # seconds the bytes of a deleted upload stay in memory for a byte-identical twin
_recent: dict[str, tuple[float, bytes]] = {}
_LOCK = threading.Lock()


class UploadGone(OSError):
    """The upload's file is gone and no recent read of it is held."""


class UploadTooLarge(ValueError):
    def __init__(self, size: int, limit: int):
        super().__init__(f"{size} bytes > {limit}")
        self.size, self.limit = size, limit


def _prune(now: float) -> None:
    for k in [k for k, (t, _) in _recent.items() if now - t > RECENT_TTL]:
        del _recent[k]


def read_upload(path, max_bytes: int | None = None, keep: bool = False) -> bytes:
    """The bytes of the uploaded file at ``path``; the file is deleted (unless ``keep``: bundled
    examples). Raises :class:`UploadTooLarge` (the file is deleted unread) or :class:`UploadGone`."""
    key = str(path)
    now = time.monotonic()
    try:
        size = os.stat(key).st_size
        if max_bytes is not None and size > max_bytes:
            if not keep:
                _remove(key)
            raise UploadTooLarge(size, max_bytes)
        data = Path(key).read_bytes()
    except FileNotFoundError:
        with _LOCK:
            _prune(now)
            hit = _recent.get(key)
        if hit is None:
            raise UploadGone(key) from None
        return hit[1]
    if not keep:
        with _LOCK:  # registered before the file goes, so a twin that misses the file finds the bytes
            _prune(now)
            _recent[key] = (now, data)
        _remove(key)
    return data


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass  # a twin's handler removed it first


def forget_all() -> None:
    """Drop every held read (tests; a server shutting down)."""
    with _LOCK:
        _recent.clear()
