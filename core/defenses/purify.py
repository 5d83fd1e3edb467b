"""Purification: what an attacker (or a social network's upload pipeline) does to photos before
fine-tuning on them, and what removes adversarial cloaks in the literature (Hönig et al., *Adversarial
perturbations cannot reliably protect artists from generative AI*, 2024: JPEG, noise, upscaling).

Each purifier is a pure function ``crop (uint8 H x W x 3) -> crop`` of the same shape; :func:`purify`
applies a chain of them to a list of photos. PIL does the image work (JPEG codec, Gaussian blur,
bicubic resampling): these are the operations an ordinary upload pipeline runs, not a learned
purifier, so they are what any attacker has for free.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

PURIFIERS = ("noise", "resize", "jpeg", "blur")  # every step a chain may name


@dataclass
class PurifyConfig:
    # the default: a noisy down-up resize then JPEG, as an upload pipeline would
    chain: tuple[str, ...] = ("noise", "resize", "jpeg")  # steps in order (noise, resize, jpeg, blur), like an upload
    jpeg_quality: int = 75  # JPEG re-compression quality (1-95; social networks use about 70-85)
    blur_sigma: float = 0.6  # Gaussian blur radius in pixels
    noise_std: float = 4.0  # Gaussian noise std on the 0-255 scale (added before resizing, as noisy upscaling does)
    resize_factor: float = 0.5  # resize down to this fraction of the side, then back up (bicubic)
    seed: int = 0  # seeds the noise (photo i gets seed + i)

    def __post_init__(self):
        self.chain = tuple(self.chain)
        unknown = [s for s in self.chain if s not in PURIFIERS]
        if unknown:
            raise ValueError(f"unknown purification step(s) {unknown!r}; choose from {PURIFIERS}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be 1..95, got {self.jpeg_quality!r}")
        if not 0 < self.resize_factor <= 1:
            raise ValueError(f"resize_factor must be in (0, 1], got {self.resize_factor!r}")
        if self.blur_sigma < 0 or self.noise_std < 0:
            raise ValueError(f"blur_sigma and noise_std must be >= 0, got {self.blur_sigma!r}, {self.noise_std!r}")

    def words(self) -> str:
        """The chain in words, for reports and the UI."""
        said = {
            "noise": f"Gaussian noise (std {self.noise_std:g}/255)",
            "resize": f"resize to {self.resize_factor:g}x and back",
            "jpeg": f"JPEG quality {self.jpeg_quality}",
            "blur": f"Gaussian blur ({self.blur_sigma:g} px)",
        }
        return ", then ".join(said[s] for s in self.chain) or "nothing"


def jpeg(crop: np.ndarray, quality: int = 75) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def blur(crop: np.ndarray, sigma: float = 0.6) -> np.ndarray:
    return np.asarray(Image.fromarray(crop).filter(ImageFilter.GaussianBlur(radius=float(sigma))))


def add_noise(crop: np.ndarray, std: float = 4.0, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, std, crop.shape)
    return np.clip(np.round(crop.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def resize_down_up(crop: np.ndarray, factor: float = 0.5) -> np.ndarray:
    h, w = crop.shape[:2]
    small = Image.fromarray(crop).resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC))


def purify_one(crop: np.ndarray, cfg: PurifyConfig, seed: int = 0) -> np.ndarray:
    out = np.ascontiguousarray(np.asarray(crop, dtype=np.uint8))
    for step in cfg.chain:
        if step == "noise":
            out = add_noise(out, cfg.noise_std, seed)
        elif step == "resize":
            out = resize_down_up(out, cfg.resize_factor)
        elif step == "jpeg":
            out = jpeg(out, cfg.jpeg_quality)
        elif step == "blur":
            out = blur(out, cfg.blur_sigma)
    return out


def purify(crops, cfg: PurifyConfig | None = None) -> list[np.ndarray]:
    """Every photo through ``cfg.chain`` (photo i's noise seeded with ``cfg.seed + i``)."""
    cfg = cfg or PurifyConfig()
    return [purify_one(c, cfg, cfg.seed + i) for i, c in enumerate(crops)]
