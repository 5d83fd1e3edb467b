"""What the app shares between visitors: the base pipeline and the read-only models built on it.

Loaded once and only read. Models built from files (the watermarked bases) are cached by *what they
are built from*: the clean base's fingerprint and each file's path, size and modification time, so a
rebuilt asset or another base is never served from a stale entry. Per-visitor work (photos, LoRAs,
results) never lives here: the UI keeps it in per-session state.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.model.pipeline import EMBEDDED_NAME, image_size_of, load_pipeline, sample_images
from core.model.prompts import CLASS_PROMPT


@dataclass(frozen=True)
class SampleRequest:
    """Settings of a base-model sampling run, validated."""

    prompt: str = CLASS_PROMPT
    n: int = 4
    seed: int = 0
    steps: int = 25
    guidance: float = 1.0

    def __post_init__(self):
        if not 1 <= self.n <= 16:
            raise ValueError(f"n must be 1..16, got {self.n!r}")
        if not 1 <= self.steps <= 100:
            raise ValueError(f"steps must be 1..100, got {self.steps!r}")
        if not 0.0 <= self.guidance <= 20.0:
            raise ValueError(f"guidance must be 0..20, got {self.guidance!r}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be 0..2^31-1, got {self.seed!r}")


class Engine:
    """The base model the app serves (the embedded miniature SD unless a model id is given).

    On a CPU every thread of the app computes on one core except the training hub's worker, which
    gets them all: Gradio runs each handler in a thread of its own, and once another thread has
    computed on several cores the hub's steps take about twice as long
    (:func:`core.model.pipeline.thread_with_cores`)."""

    def __init__(
        self, model: str | None = None, device: str | None = None, attacker: str | None = None, hub_config=None
    ):
        self.model_name = model or EMBEDDED_NAME
        self.hub_config = hub_config
        self.pipe = load_pipeline(model, device, threads=1)
        self.image_size = image_size_of(self.pipe)
        self._attacker_path = attacker
        self._attacker = None
        self._floor = None
        self._lock = threading.Lock()

    def attacker(self):
        """(the weight-only attacker for this base model, or None, and a sentence saying why not)."""
        from core.attack.attacker import ATTACKER_DIR, load_attacker

        with self._lock:
            if self._attacker is None:
                from pathlib import Path

                path = Path(self._attacker_path or ATTACKER_DIR / "attacker.safetensors")
                if not path.exists():
                    self._attacker = (
                        None,
                        f"No trained attacker found at `{path}`: run `python -m core.attack.train`.",
                    )
                else:
                    model, info = load_attacker(path, self.pipe.device)
                    if model.cfg.base != self.fingerprint:
                        self._attacker = (
                            None,
                            f"The shipped attacker was trained for another base model "
                            f"(fingerprint {model.cfg.base}; this app runs `{self.model_name}`, "
                            f"{self.fingerprint}). Train one for this model with "
                            "`python -m core.attack.shadow` and `python -m core.attack.train`.",
                        )
                    else:
                        self._attacker = (model, "")
            return self._attacker

    def floor_images(self) -> list[np.ndarray]:
        """The base model's class-prompt samples of the identity protocol (cached: the floor of every score)."""
        from core.faces.utility import floor_images

        with self._lock:
            if self._floor is None:
                self._floor = floor_images(self.pipe)
            return self._floor

    def hub(self):
        """The training hub of this app (started on first use): every visitor's fine-tune goes through it."""
        from core.finetune.hub import TrainingHub

        with self._lock:
            hub = getattr(self, "_hub", None)
        if hub is None:
            attacker, _ = self.attacker()
            floor = self.floor_images()
            with self._lock:
                if getattr(self, "_hub", None) is None:
                    self._hub = TrainingHub(self.pipe, attacker, floor, self.hub_config)
                hub = self._hub
        return hub

    def free_cores(self) -> int:
        """Cores a visitor's one-off job (a cloak) may compute on now: every core while no fine-tune
        runs or waits, else one (the training hub has the others)."""
        from core.model.pipeline import cores

        with self._lock:
            hub = getattr(self, "_hub", None)
        return cores() if hub is None or hub.idle() else 1

    def compiling(self) -> bool:
        """True while the training hub (if started) still compiles its step in the background."""
        with self._lock:
            hub = getattr(self, "_hub", None)
        return hub is not None and hub.compiling

    @property
    def device(self) -> str:
        return str(self.pipe.device)

    @property
    def fingerprint(self) -> str:
        """The base model's fingerprint (``core.model.prior.base_fingerprint``), as studies record it."""
        from core.model.prior import base_fingerprint

        return base_fingerprint(self.pipe)

    def sample(self, req: SampleRequest) -> list[np.ndarray]:
        return sample_images(self.pipe, req.prompt, n=req.n, seed=req.seed, steps=req.steps, guidance=req.guidance)


_shared: dict = {}
_shared_lock = threading.Lock()


def _file_key(path: Path) -> tuple:
    try:
        st = path.stat()
        return (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return (str(path), None, None)


def shared_model(key: tuple, build):
    """``build()``, once per ``key`` (what the model is built from); every caller gets the same object."""
    with _shared_lock:
        if key not in _shared:
            _shared[key] = build()
        return _shared[key]


def watermarked_base(name: str, clean, folder: str | Path | None = None):
    """(watermarked pipeline, key) of a shipped watermark over the ``clean`` base, or (None, a sentence
    saying why not: missing, or made for another base). Cached by the base's fingerprint and the
    delta and key files' identity."""
    from core.model.prior import base_fingerprint
    from core.watermark.formats import SHIPPED, WATERMARK_DIR, KeyFileError
    from core.watermark.shipped import embed_command, shipped_watermark

    folder = Path(folder or WATERMARK_DIR)
    delta, key_file = (folder / f for f in SHIPPED[name])

    def build():
        if not delta.exists() or not key_file.exists():
            return (
                None,
                f"**The {name}-watermarked base is not shipped** (`assets/watermark/{delta.name}` and its "
                f"key `{key_file.name}` are missing), so there is nothing to check. Build it with\n\n"
                f"```bash\n{embed_command(name)}\n```",
            )
        try:
            return shipped_watermark(name, clean, folder)
        except (KeyFileError, OSError, ValueError) as e:
            return (None, f"**The {name} watermark could not be loaded**: {e}")

    return shared_model(("watermark", name, base_fingerprint(clean), _file_key(delta), _file_key(key_file)), build)
