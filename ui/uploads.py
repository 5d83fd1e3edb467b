"""A visitor's uploads: private from the moment they arrive, read by the visitor's own session, then gone.

Gradio stores an upload at ``<upload folder>/<hash of its bytes>/<file name>``: two visitors who send
the same file share that path, and holding the path is all it takes to use the file. The app changes
that at the door. :class:`PrivateUploads` (middleware on Gradio's own ``/upload`` route, installed by
``app.LabBlocks.launch``) moves each upload to a folder of its own, ``<upload folder>/leaklab-uploads/
<128 random bits>/<file name>``, and answers that path: an upload is known only to the browser that
sent it, byte-identical uploads never share a file (so neither can delete the other's), and every
upload lies in one folder the app empties at start-up and shutdown.

A handler accepts a file only from where a visitor's own input can come from (:func:`origin`): a
fresh upload, a file of the visitor's own session dir, or a bundled example. Anything else (another
session's crops or LoRA, Gradio's cache, ...) is refused unread and untouched (:class:`NotYours`).
An upload is read once and deleted at once (:func:`read_upload`, :func:`local_file`); nothing read is
kept in this module. What a handler *made* of an upload (a crop, a checked LoRA, or the sentence
refusing it) is kept in the visitor's session (``VisitorSession.reads``), so the same visitor
re-sending the path (a browser sends a File's value with every click) gets it again, and nobody else
does. An upload no handler read within :data:`UPLOAD_TTL` seconds was abandoned (the tab closed
during the upload) and :func:`sweep` deletes it. Nothing here is logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import ASSETS

UPLOAD_DIR = "leaklab-uploads"  # under Gradio's upload folder
UPLOAD_TTL = 45.0  # seconds an upload may wait for the handler its upload triggers; the sweep runs every 10 s
EXAMPLES = ASSETS / "examples"  # bundled faces drawn by the base model: readable, never deleted
TWIN_WINDOW = 5.0  # seconds a spare link of each private copy is kept for a byte-identical twin
_LOCK = threading.Lock()
_moved: dict[str, Path] = {}  # Gradio's shared path -> a spare link of the last private copy made of it
_spares: list[tuple[float, str, Path]] = []  # (when, shared path, spare link), oldest first


class UploadError(OSError):
    """An upload the handler cannot use; ``str(err)`` is a sentence for the visitor."""


class NotYours(UploadError):
    def __init__(self):
        super().__init__("this is not a file you uploaded in this visit; please upload the file itself.")


class UploadGone(UploadError):
    def __init__(self):
        super().__init__("the file could not be read (it is no longer on the server); please upload it again.")


class UploadTooLarge(UploadError):
    def __init__(self, size: int, limit: int):
        super().__init__(f"the file is {size / 2**20:.1f} MB; files up to {limit // 2**20} MB are accepted.")
        self.size, self.limit = size, limit


def upload_root() -> Path:
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()) / UPLOAD_DIR


# 1. at the door ---------------------------------------------------------------------------------


def make_private(path) -> Path:
    """Move an upload from Gradio's shared, content-addressed path into a folder of its own with a
    128-bit random name (same file name). Two byte-identical uploads finishing together can find the
    shared path already moved: the second is then linked to the first's private copy (same bytes)."""
    src = Path(path)
    target = upload_root() / secrets.token_hex(16) / src.name
    target.parent.mkdir(mode=0o700, parents=True)
    spare = upload_root() / ".twins" / secrets.token_hex(16)  # read by no handler: outlives the copy's reading
    with _LOCK:
        _forget_twins(time.monotonic())
        spare.parent.mkdir(mode=0o700, exist_ok=True)
        try:
            os.link(src, target)
        except FileNotFoundError:
            twin = _moved.get(str(src))
            if twin is None:
                raise
            os.link(twin, target)
        except OSError:  # another file system: copy
            shutil.copyfile(src, target)
        os.link(target, spare)
        _moved[str(src)] = spare
        _spares.append((time.monotonic(), str(src), spare))
        _remove(src)  # (Gradio's per-hash folder stays: removing it could race Gradio writing the next upload there)
    return target


def _forget_twins(now: float, window: float = TWIN_WINDOW) -> None:
    while _spares and now - _spares[0][0] > window:
        _, src, spare = _spares.pop(0)
        if _moved.get(src) == spare:
            del _moved[src]
        _remove(spare)


class PrivateUploads:
    """ASGI middleware: the answer of Gradio's ``POST .../upload`` names private copies
    (:func:`make_private`); files under the ``private()`` folders are served with ``Cache-Control:
    no-store``, so a shared computer's browser keeps no copy of a visitor's images."""

    def __init__(self, app, private=lambda: ()):
        self.app, self.private = app, private

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if scope["method"] == "POST" and path.endswith("/upload"):
            return await self.app(scope, receive, self._rewrite(send))
        if scope["method"] in ("GET", "HEAD") and "/file=" in path and self._is_private(path.split("/file=", 1)[1]):
            return await self.app(scope, receive, self._no_store(send))
        return await self.app(scope, receive, send)

    def _is_private(self, file_path: str) -> bool:
        p = os.path.realpath(file_path)
        return any(p.startswith(os.path.realpath(r) + os.sep) for r in self.private())

    def _no_store(self, send):
        async def wrapped(msg):
            if msg["type"] == "http.response.start":
                headers = [(k, v) for k, v in msg.get("headers", []) if k.lower() not in (b"cache-control", b"etag")]
                msg = {**msg, "headers": headers + [(b"cache-control", b"no-store")]}
            await send(msg)

        return wrapped

    def _rewrite(self, send):
        start, body = {}, []

        async def wrapped(msg):
            if msg["type"] == "http.response.start":
                start.update(msg)
                return
            if msg["type"] != "http.response.body":
                return await send(msg)
            body.append(msg.get("body", b""))
            if msg.get("more_body"):
                return
            data = b"".join(body)
            if start.get("status") == 200:
                data = json.dumps([str(_private_or_gone(p)) for p in json.loads(data)]).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})

        return wrapped


def _private_or_gone(path: str) -> Path:
    try:
        return make_private(path)
    except OSError:  # vanishingly rare (a twin's copy already read): the handler will ask for the file again
        return upload_root() / secrets.token_hex(16) / Path(path).name


# 2. in a handler --------------------------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(folder)) in Path(os.path.realpath(path)).parents


def origin(path, session) -> str | None:
    """Where a handler's file input comes from: "upload" (a fresh upload: read once, then deleted),
    "own" (a file of ``session``'s own dir), "example" (a bundled example face), or None (anything
    else: never read, never deleted)."""
    p = Path(path)
    if _inside(p, upload_root()):
        return "upload"
    if session is not None and _inside(p, session.path):
        return "own"
    if _inside(p, EXAMPLES):
        return "example"
    return None


def _size(path: Path, limit: int | None, delete: bool) -> int:
    try:
        size = os.stat(path).st_size
    except OSError:
        raise UploadGone() from None
    if limit is not None and size > limit:
        if delete:
            _remove(path)  # refused unread: its bytes are gone at once
        raise UploadTooLarge(size, limit)
    return size


def read_upload(path, session=None, max_bytes: int | None = None) -> bytes:
    """The bytes of a visitor's file input; an upload is deleted once read. Raises :class:`NotYours`,
    :class:`UploadGone` or :class:`UploadTooLarge` (an upload over ``max_bytes`` is deleted unread)."""
    kind = origin(path, session)
    if kind is None:
        raise NotYours()
    _size(Path(path), max_bytes, delete=kind == "upload")
    try:
        data = Path(path).read_bytes()
    except OSError:
        raise UploadGone() from None
    finally:
        if kind == "upload":
            _remove(Path(path))
    return data


@contextmanager
def local_file(path, session=None, max_bytes: int | None = None):
    """A visitor's file input as a file to read in place (an upload already lies in a private folder
    of its own under the visitor's own file name); an upload is deleted when the block ends."""
    kind = origin(path, session)
    if kind is None:
        raise NotYours()
    p = Path(path)
    try:
        _size(p, max_bytes, delete=kind == "upload")
        yield p
    finally:
        if kind == "upload":
            _remove(p)


def _remove(path: Path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
    if _inside(path, upload_root()) and Path(path).parent.name != ".twins":
        try:
            Path(path).parent.rmdir()
        except OSError:
            pass


# 3. leftovers ------------------------------------------------------------------------------------


def sweep(ttl: float | None = None) -> int:
    """Delete uploads no handler read within ``ttl`` seconds (default :data:`UPLOAD_TTL`), and Gradio's
    spool files of uploads that stopped half-way (a tab closed during an upload); returns how many went."""
    ttl = UPLOAD_TTL if ttl is None else ttl
    with _LOCK:
        _forget_twins(time.monotonic())
    now, removed = time.time(), 0
    root = upload_root()
    candidates = [p for p in root.glob("*") if p.name != ".twins"] if root.is_dir() else []
    if root.parent.is_dir():
        candidates += [p for p in root.parent.glob("tmp*") if p.is_file()]
    for p in candidates:
        try:
            old = now - max(q.stat().st_mtime for q in [p, *p.glob("*")]) > ttl
        except OSError:
            continue
        if old:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else _remove(p)
            removed += 1
    return removed


def empty() -> None:
    """Delete every upload (start-up and shutdown: no visitor of this process is left)."""
    with _LOCK:
        _moved.clear()
        _spares.clear()
    shutil.rmtree(upload_root(), ignore_errors=True)


# 4. photos ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoRead:
    """One photo input: its crop or the sentence refusing it, and what to tell about a usable one."""

    name: str
    crop: np.ndarray | None = None
    problem: str | None = None
    notes: tuple[str, ...] = ()


def read_photo(path, session, size: int) -> PhotoRead:
    """One file input -> :class:`PhotoRead`. Never raises: whatever goes wrong with this file is a
    sentence about this file, so the visitor's other photos still count."""
    from core.faces.ingest import MAX_BYTES, IngestError, ingest_face

    name = Path(path).name
    try:
        raw = read_upload(path, session, MAX_BYTES)
        got = ingest_face(raw, size=size)
        return PhotoRead(name, got.crop, notes=got.notes)
    except UploadTooLarge:
        return PhotoRead(
            name, problem=f"the file is larger than {MAX_BYTES // 2**20} MB; please upload a smaller photo."
        )
    except (IngestError, UploadError) as e:
        return PhotoRead(name, problem=_sentence(str(e)))
    except (MemoryError, RecursionError, OverflowError, ValueError, OSError, SyntaxError):
        return PhotoRead(
            name, problem="this file could not be read as a photo; please save it again as JPEG or PNG and upload that."
        )


def read_photos(files, session, size: int) -> list[PhotoRead]:
    """Every photo input, each read once: a path this session already read (a browser re-sends a
    File's value) gives what it gave then, from the session (nobody else's)."""
    out = []
    with session.reading if session is not None else contextlib.nullcontext():
        for f in files or []:
            path = str(f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", f))
            known = session.reads.get(path) if session is not None else None
            if not isinstance(known, PhotoRead):
                known = read_photo(path, session, size)
                if session is not None:
                    session.remember(path, known)
            out.append(known)
    return out


def photo_lines(reads: list[PhotoRead]) -> tuple[list[str], list[str]]:
    """(a line per refused photo, a line per remark on a usable one), numbered as uploaded."""
    left, notes = [], []
    for i, r in enumerate(reads, 1):
        if r.problem:
            left.append(f"- photo {i} (`{r.name}`): {r.problem}")
        notes += [f"- photo {i} (`{r.name}`): {n}" for n in r.notes]
    return left, notes


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text
