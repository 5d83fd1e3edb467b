"""The owner's own data for embedding a watermark: training latents and the lazy-layer probe photos.

The owner (the base model's maker) uses photos of the base's own pre-training identities for the
denoising loss, and public faces (the first shadow identity) for the probe fine-tunes that rank the
layers; neither are victims.
"""

from __future__ import annotations

import numpy as np
import torch

from core.faces import aligned


def owner_latents(pipe, n: int, root=None) -> torch.Tensor:
    """Scaled VAE latents of ``n`` of the owner's own training photos (pretrain identities; the
    denoising loss of the embedding), at the model's resolution."""
    from core.faces import aligned, data
    from core.finetune.lora import encode_photos
    from core.model.pipeline import image_size_of

    paths = [p for ps in data.Split.load().paths("pretrain", root).values() for p in ps]
    rng = np.random.default_rng(0)
    pick = [paths[i] for i in rng.choice(len(paths), min(n, len(paths)), replace=False)]
    crops = aligned.load_crops(pick, size=image_size_of(pipe))
    return torch.cat([encode_photos(pipe, crops[i : i + 64]) for i in range(0, len(crops), 64)])


def probe_photos(pipe, n: int = 5, root=None) -> list:
    """The owner's public probe faces: the first shadow identity with >= ``n`` photos."""
    from core.faces import data
    from core.model.pipeline import image_size_of

    people = data.Split.load().paths("shadow", root)
    name = probe_identity(people, n)
    return list(aligned.load_crops(people[name][:n], size=image_size_of(pipe)))


def probe_identity(people: dict, n: int = 5) -> str:
    """The shadow identity whose photos the owner's probe fine-tunes use (the first with >= ``n``)."""
    return next(k for k, v in people.items() if len(v) >= n)
