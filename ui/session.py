"""A visitor's private workspace: photos, crops and LoRAs in memory plus one temp dir of its own.

Held in a ``gr.State`` (one per browser session, never shared). Every file the app shows a visitor
(face crops, previews, reconstructions, the LoRA download) is written into that session's dir by
:func:`media`; the dir lies under :data:`SESSION_ROOT`, which the app registers as a Gradio static
path, so Gradio serves these files from there instead of keeping copies in its own cache. Anyone
holding such a file's URL could fetch it, so no name can be guessed or repeats: the dir's name holds
128 random bits (``secrets``, not ``mkdtemp``'s ~42), and a file's name is a keyed hash (HMAC with
the session's own random key) of its content, so the same image gets different names in different
sessions. The dir is created when the first file is written (a visit that only sends refused files
leaves no folder). Handlers accept no file of another session (:func:`ui.uploads.origin`).

The session is deleted (memory cleared, dir removed):

- when the browser session ends: ``app.build_demo`` wires the documented ``demo.unload`` to
  :func:`end_session`, which closes every session opened under that ``request.session_hash``
  (handlers register their session with :func:`ensure` and the request); Gradio also calls
  :func:`close_session` through the state's ``delete_callback``;
- after :data:`SESSION_TTL` seconds without use: :func:`sweep` (run every :data:`SWEEP_EVERY`
  seconds by :class:`Sweeper`, beside :func:`ui.uploads.sweep` for abandoned uploads);
- at start-up and shutdown (also on SIGTERM): :func:`empty_root` removes everything under
  :data:`SESSION_ROOT` and every upload.

Nothing in here is ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

SESSION_TTL = 2 * 3600  # seconds a session's data may live without being used
SWEEP_EVERY = 10.0  # seconds between two sweeps of idle sessions and abandoned uploads
READS_KEPT = 64  # file inputs a session remembers what it made of (ui.uploads)
# every session dir lies here; LEAKLAB_SESSION_ROOT gives each test process (or server) its own
SESSION_ROOT = Path(os.environ.get("LEAKLAB_SESSION_ROOT") or Path(tempfile.gettempdir()) / "leaklab-sessions")
DIR_PREFIX = "leaklab-session-"
_LIVE: dict[int, VisitorSession] = {}  # open sessions, for the time-out sweep
_BY_HASH: dict[str, list[VisitorSession]] = {}  # Gradio's session_hash -> the sessions its handlers opened
_LOCK = threading.Lock()
_OPENING = threading.Lock()  # held by ensure() while it finds or opens a browser session's session


class SessionClosed(gr.Error):
    def __init__(self):
        super().__init__("This visit has ended and its files were deleted; reload the page to start again.")


@dataclass(eq=False)
class VisitorSession:
    crops: list = field(default_factory=list)  # uint8 face crops at the model's resolution, in memory
    result: object = None  # the last FinetuneResult
    trained_on: list = field(default_factory=list)  # the crops that result was fine-tuned on
    stop_requested: bool = False  # the visitor pressed Stop: the training hub takes their run out
    layer_steps: dict = field(default_factory=dict)  # {step: per-layer change} recorded in a fine-tune (ui.layers_tab)
    reads: dict = field(default_factory=dict)  # file input path -> what a handler made of it (ui.uploads)
    # held while a handler reads a file input and records what it made of it: an upload's own handler and a
    # button pressed at once (two events of one visitor run concurrently) then never both read it
    reading: threading.RLock = field(default_factory=threading.RLock, repr=False)
    last_used: float = field(default_factory=time.monotonic)
    session_hash: str | None = None  # the browser session that opened it (for demo.unload)
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)  # names its media files
    name: str = field(default_factory=lambda: DIR_PREFIX + secrets.token_hex(16))  # 128 random bits
    closed: bool = False

    def __post_init__(self):
        with _LOCK:
            _LIVE[id(self)] = self

    @property
    def path(self) -> Path:
        """Where the session's dir is (or will be); nothing is created."""
        return SESSION_ROOT / self.name

    @property
    def dir(self) -> Path:
        """The session's dir, created on first use; a closed session's raises :class:`SessionClosed`
        (a fine-tune still running after its visitor left writes nothing)."""
        if self.closed:
            raise SessionClosed()
        SESSION_ROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.mkdir(mode=0o700, exist_ok=True)
        return self.path

    def remember(self, path: str, made) -> None:
        """What a handler made of a file input (kept for the session's own re-sends, at most READS_KEPT)."""
        self.reads[path] = made
        while len(self.reads) > READS_KEPT:
            self.reads.pop(next(iter(self.reads)))

    def close(self) -> None:
        self.closed = True
        with _LOCK:
            _LIVE.pop(id(self), None)
            if self.session_hash in _BY_HASH:
                _BY_HASH[self.session_hash] = [s for s in _BY_HASH[self.session_hash] if s is not self]
                if not _BY_HASH[self.session_hash]:
                    del _BY_HASH[self.session_hash]
        self.crops.clear()
        self.trained_on.clear()
        self.layer_steps.clear()
        self.reads.clear()
        self.result = None
        shutil.rmtree(self.path, ignore_errors=True)


def sweep(ttl: float = SESSION_TTL) -> int:
    """Close every session unused for ``ttl`` seconds and remove session dirs no open session owns
    that are older than ``ttl``; returns how many were removed."""
    now = time.monotonic()
    with _LOCK:
        stale = [s for s in _LIVE.values() if now - s.last_used > ttl]
        owned = {s.name for s in _LIVE.values()}
    for s in stale:
        s.close()
    removed = len(stale)
    if SESSION_ROOT.is_dir():
        for d in SESSION_ROOT.glob(DIR_PREFIX + "*"):
            try:
                old = time.time() - d.stat().st_mtime > ttl
            except OSError:
                continue
            if old and d.name not in owned:
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
    return removed


def ensure(session: VisitorSession | None, request: gr.Request | None = None) -> VisitorSession:
    """The visitor's open session (a fresh one if there is none or it was closed), marked used and
    registered under the browser's ``request.session_hash`` (so the visit's end closes it)."""
    sh = getattr(request, "session_hash", None)
    if session is None or session.closed:
        # A visitor's first events can run at once (an upload's own handler and a button pressed right
        # after it), each before the other has put its session into the page's state: they share the
        # browser session's open one (one reading lock, one reading of each upload) instead of opening
        # one each, so finding it or opening it is one step.
        with _OPENING:
            with _LOCK:
                open_now = [s for s in _BY_HASH.get(sh, []) if not s.closed] if sh else []
            session = open_now[-1] if open_now else VisitorSession()
            _register(session, sh)
    else:
        _register(session, sh)
    session.last_used = time.monotonic()
    return session


def _register(session: VisitorSession, sh: str | None) -> None:
    if sh and session.session_hash != sh:
        session.session_hash = sh
        with _LOCK:
            _BY_HASH.setdefault(sh, []).append(session)


def close_session(session: VisitorSession | None) -> None:
    if session is not None:
        session.close()


def end_session(request: gr.Request) -> None:
    """``demo.unload`` handler: the browser session ended, so every session its handlers opened is
    closed now (memory cleared, dir removed)."""
    with _LOCK:
        sessions = list(_BY_HASH.get(getattr(request, "session_hash", None) or "", []))
    for s in sessions:
        s.close()


def empty_root() -> None:
    """Remove every session dir and every upload: at start-up (a crash or SIGTERM of an earlier
    server left them) and at shutdown (no visitor of this process is left)."""
    from ui import uploads

    with _LOCK:
        live = list(_LIVE.values())
    for s in live:
        s.close()
    if SESSION_ROOT.is_dir():
        for p in SESSION_ROOT.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    uploads.empty()


class Sweeper:
    """Background thread: every :data:`SWEEP_EVERY` seconds, idle sessions (:func:`sweep`) and
    abandoned uploads (:func:`ui.uploads.sweep`) are deleted."""

    def __init__(self, every: float | None = None):
        self.every, self._stop = every, threading.Event()
        self._thread = threading.Thread(target=self._run, name="leaklab-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from ui import uploads

        while not self._stop.wait(self.every or SWEEP_EVERY):
            try:
                sweep()
                uploads.sweep()
            except Exception:  # noqa: BLE001 - a failed sweep is retried at the next tick; never logged (paths)
                pass


def parse_seed(value) -> int:
    """A seed field: empty -> a fresh random seed; else a whole number 0..2^31-1, or a gr.Error
    sentence quoting what was typed."""
    if value in (None, ""):
        return secrets.randbelow(2**31)
    try:
        seed = float(value)
        ok = seed.is_integer() and 0 <= seed < 2**31
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise gr.Error(
            f"The seed must be a whole number from 0 to {2**31 - 1} (or empty for a fresh random one); "
            f"got {str(value)[:40]!r}."
        )
    return int(seed)


def _image_file(session: VisitorSession, img) -> str:
    arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8) if arr.dtype != np.uint8 else arr).save(buf, "PNG")
    data = buf.getvalue()
    out = session.dir / "media"
    out.mkdir(exist_ok=True)
    path = out / f"{hmac.new(session.key, data, hashlib.sha256).hexdigest()[:32]}.png"  # 128 bits, per session
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
