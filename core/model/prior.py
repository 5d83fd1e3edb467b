"""Prior preservation: class images sampled once from the base model, cached per base model.

DreamBooth keeps the class ("a photo of a face") from collapsing onto the visitor's face by
training on class images the base model drew itself. We cache their *latents* (the sampler's
output before decoding: exactly what training needs) under ``$LEAKLAB_CACHE`` (default
``~/.cache/lora-leak-lab``), keyed by the base model's fingerprint, so every later fine-tune on
the same base reuses them.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from core.model.pipeline import image_size_of, initial_latents, private_view
from core.model.prompts import CLASS_PROMPT

_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("LEAKLAB_CACHE", Path.home() / ".cache" / "lora-leak-lab"))


def base_fingerprint(pipe) -> str:
    """A short hash identifying the base model: the UNet's, autoencoder's and scheduler's configs
    (resolution, latent channels, prediction type) and the shape + first 256 values of every UNet
    and text encoder tensor (fast even for SD 1.x, and different for any retrained model). Cached
    on the pipe."""
    fp = getattr(pipe, "_leaklab_fingerprint", None)
    if fp:
        return fp
    h = hashlib.sha256()
    for mod in (pipe.unet, pipe.vae, pipe.scheduler):
        cfg = {k: v for k, v in dict(mod.config).items() if not k.startswith("_")}
        h.update(f"{type(mod).__name__}:{sorted(cfg.items(), key=lambda kv: kv[0])!r}".encode())
    for mod in (pipe.unet, pipe.text_encoder):
        for name, t in sorted(mod.state_dict().items()):
            if "lora" in name:
                continue
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().flatten()[:256].float().cpu().numpy().tobytes())
    pipe._leaklab_fingerprint = h.hexdigest()[:16]
    return pipe._leaklab_fingerprint


@torch.no_grad()
def sample_class_latents(pipe, n: int, steps: int = 25, seed: int = 10_000, batch: int = 16) -> torch.Tensor:
    """``n`` class-prompt samples as scaled latents (n x 4 x h x w), seeds seed..seed+n-1."""
    view = private_view(pipe)
    size = image_size_of(pipe)
    out = []
    for s in range(seed, seed + n, batch):
        k = min(batch, seed + n - s)
        r = view(
            prompt=[CLASS_PROMPT] * k,
            latents=initial_latents(pipe, range(s, s + k), size),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=1.0,
            output_type="latent",
        )
        out.append(r.images.float().cpu())
    return torch.cat(out)


def class_latents(pipe, n: int) -> torch.Tensor:
    """The cached class latents of this base model (sampled on first use), first ``n`` of them."""
    path = cache_dir() / "class_latents" / f"{base_fingerprint(pipe)}.safetensors"
    with _lock:
        have = load_file(path)["latents"] if path.exists() else None
        if have is None or len(have) < n:
            done = 0 if have is None else len(have)
            more = sample_class_latents(pipe, n - done, seed=10_000 + done)
            have = more if have is None else torch.cat([have, more])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes sharing the cache never share a tmp file
            save_file({"latents": have.contiguous()}, tmp)
            tmp.replace(path)
    return have[:n]


def decode_latents(pipe, latents: torch.Tensor) -> list[np.ndarray]:
    """Scaled latents -> uint8 images (to look at the class images)."""
    with torch.no_grad():
        x = pipe.vae.decode(latents.to(pipe.device, pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return list(x)
