"""GPU Spaces: handlers that run the model are wrapped with ``spaces.GPU`` where that package exists.

On a Hugging Face ZeroGPU Space a GPU is attached to a call only inside a function decorated with
``spaces.GPU``; everywhere else (this CPU default, an ordinary GPU Space or machine) the package is
absent or the decorator is not needed, and the handler is returned unchanged. So the same ``app.py``
runs on every kind of hardware with no code change.

The ZeroGPU documentation's pattern, followed here: ``import spaces`` first (it refuses to load once
torch has initialised CUDA; ``app.py`` imports this module before anything that imports torch, and
this module imports no torch), load the pipeline at start-up and place it on ``cuda``
(:func:`startup_device`; ZeroGPU keeps it ready and moves it onto the GPU each decorated call
gets), then decorate the handlers (:func:`on_gpu`). Spaces mark ZeroGPU hardware with
``SPACES_ZERO_GPU=true``.
"""

from __future__ import annotations

import importlib.util
import os

if importlib.util.find_spec("spaces") is not None:
    import spaces  # noqa: F401  (before torch touches CUDA)


def zero_gpu() -> bool:
    """Whether this process runs on a ZeroGPU Space (``SPACES_ZERO_GPU`` set and the ``spaces`` package
    installed). There a GPU exists only inside ``spaces.GPU`` calls, so the shared training hub (a
    background thread) cannot use it, and each visitor's fine-tune runs inside their own call."""
    return (
        os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
        and importlib.util.find_spec("spaces") is not None
    )


def startup_device(device: str | None = None) -> str | None:
    """The device to load the pipeline on at start-up: ``device`` if given; ``"cuda"`` on ZeroGPU
    (as the ZeroGPU docs place it); else None (the model picks CUDA when it sees a GPU, else CPU)."""
    if device:
        return device
    return "cuda" if zero_gpu() else None


def on_gpu(fn, seconds: int = 120):
    """``spaces.GPU(duration=seconds)(fn)`` where the ``spaces`` package is installed, else ``fn``."""
    if importlib.util.find_spec("spaces") is None:
        return fn
    import spaces

    return spaces.GPU(duration=seconds)(fn)
