"""GPU Spaces: handlers that run the model are wrapped with ``spaces.GPU`` where that package exists.

On a Hugging Face ZeroGPU Space a GPU is attached to a call only inside a function decorated with
``spaces.GPU``; everywhere else (this CPU default, an ordinary GPU Space or machine) the package is
absent or the decorator is not needed, and the handler is returned unchanged. So the same ``app.py``
runs on every kind of hardware with no code change: the model itself picks CUDA when it sees a GPU
(``core.model.pipeline.pick_device``).
"""

from __future__ import annotations

import importlib.util


def on_gpu(fn, seconds: int = 120):
    """``spaces.GPU(duration=seconds)(fn)`` where the ``spaces`` package is installed, else ``fn``."""
    if importlib.util.find_spec("spaces") is None:
        return fn
    import spaces

    return spaces.GPU(duration=seconds)(fn)


def zero_gpu() -> bool:
    """Running on a ZeroGPU Space: a GPU exists only inside ``spaces.GPU`` calls, so the shared training
    hub (a background thread) cannot use it, and each visitor's fine-tune runs inside their own call."""
    import os

    return importlib.util.find_spec("spaces") is not None and bool(os.environ.get("SPACES_ZERO_GPU"))
