"""A visitor's private workspace: photos, crops and LoRAs in memory plus one temp dir of its own.

Held in a ``gr.State`` (one per browser session, never shared). Every file the app shows a visitor
(face crops, previews, reconstructions, the LoRA download) is written into that session's dir by
:func:`media`; the dir lies under :data:`SESSION_ROOT`, which the app registers as a Gradio static
path, so Gradio serves these files from there instead of keeping copies in its own cache. The
session is deleted (memory cleared, dir removed):

- when the browser session ends: ``app.build_demo`` wires ``demo.unload`` to :func:`end_session`,
  which deletes the session's state at once (Gradio itself would keep a closed session's state for
  an hour), and Gradio calls :func:`close_session` through the state's ``delete_callback``;
- after :data:`SESSION_TTL` seconds without use: :func:`sweep` runs whenever a session is used and
  also removes dirs left behind by an earlier server process.

Nothing in here is ever logged.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SESSION_TTL = 2 * 3600  # seconds a session's data may live without being used
SESSION_ROOT = Path(tempfile.gettempdir()) / "leaklab-sessions"  # every session dir lies here
_LIVE: dict[int, VisitorSession] = {}  # open sessions, for the time-out sweep
_LOCK = threading.Lock()


def _new_dir() -> Path:
    SESSION_ROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="leaklab-session-", dir=SESSION_ROOT))


@dataclass(eq=False)
class VisitorSession:
    dir: Path = field(default_factory=_new_dir)
    crops: list = field(default_factory=list)  # uint8 64x64x3 face crops, in memory
    result: object = None  # the last FinetuneResult
    trained_on: list = field(default_factory=list)  # the crops that result was fine-tuned on
    stop_requested: bool = False  # the visitor pressed Stop: the training hub takes their run out
    layer_steps: dict = field(default_factory=dict)  # {step: per-layer change} recorded during a fine-tune (ui.layers_tab)
    last_used: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        with _LOCK:
            _LIVE[id(self)] = self

    def close(self) -> None:
        with _LOCK:
            _LIVE.pop(id(self), None)
        self.crops.clear()
        self.trained_on.clear()
        self.layer_steps.clear()
        self.result = None
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def closed(self) -> bool:
        return not self.dir.exists()


def sweep(ttl: float = SESSION_TTL) -> int:
    """Close every session unused for ``ttl`` seconds and remove session dirs no open session owns
    that are older than ``ttl`` (left by a server that stopped); returns how many were removed."""
    now = time.monotonic()
    with _LOCK:
        stale = [s for s in _LIVE.values() if now - s.last_used > ttl]
        owned = {s.dir.resolve() for s in _LIVE.values()}
    for s in stale:
        s.close()
    removed = len(stale)
    if SESSION_ROOT.is_dir():
        for d in SESSION_ROOT.glob("leaklab-session-*"):
            try:
                old = time.time() - d.stat().st_mtime > ttl
            except OSError:
                continue
            if old and d.resolve() not in owned:
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
    return removed


def ensure(session: VisitorSession | None) -> VisitorSession:
    """The visitor's open session (a fresh one if there is none or it was closed); marks it used."""
    sweep()
    if session is None or session.closed:
        return VisitorSession()
    session.last_used = time.monotonic()
    return session


def close_session(session: VisitorSession | None) -> None:
    if session is not None:
        session.close()


def end_session(demo, request) -> None:
    """``demo.unload`` handler: the browser session ended, so its state (and with it, through the
    ``delete_callback``, the visitor's files) is deleted now."""
    holder = getattr(demo, "state_holder", None)
    if holder is not None and request is not None and request.session_hash:
        holder.delete_state(request.session_hash)


def _image_file(session: VisitorSession, img) -> str:
    arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8) if arr.dtype != np.uint8 else arr).save(buf, "PNG")
    data = buf.getvalue()
    out = session.dir / "media"
    out.mkdir(exist_ok=True)
    path = out / f"{hashlib.sha256(data).hexdigest()[:24]}.png"
    if not path.exists():
        path.write_bytes(data)
    return str(path)


def media(session: VisitorSession, value):
    """An output value with every image (numpy array or PIL) replaced by a PNG file in the session's
    dir: lists, (image, caption) pairs and ``gr.update`` dicts are followed; anything else is returned
    as it is. Gradio then serves the file from the session dir and copies nothing to its cache."""
    if isinstance(value, (np.ndarray, Image.Image)):
        return _image_file(session, value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (np.ndarray, Image.Image)):
        return (_image_file(session, value[0]), value[1])
    if isinstance(value, list):
        return [media(session, v) for v in value]
    if isinstance(value, dict) and value.get("__type__") == "update" and "value" in value:
        return {**value, "value": media(session, value["value"])}
    return value
