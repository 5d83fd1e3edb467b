"""What the app shares between visitors: the base pipeline, loaded once and only read.

Per-visitor work (photos, LoRAs, results) never lives here: the UI keeps it in per-session state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.pipeline import EMBEDDED_NAME, image_size_of, load_pipeline, sample_images
from core.prompts import CLASS_PROMPT


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
    """The base model the app serves (the embedded miniature SD unless a model id is given)."""

    def __init__(self, model: str | None = None, device: str | None = None):
        self.model_name = model or EMBEDDED_NAME
        self.pipe = load_pipeline(model, device)
        self.image_size = image_size_of(self.pipe)

    @property
    def device(self) -> str:
        return str(self.pipe.device)

    def sample(self, req: SampleRequest) -> list[np.ndarray]:
        return sample_images(self.pipe, req.prompt, n=req.n, seed=req.seed, steps=req.steps, guidance=req.guidance)
