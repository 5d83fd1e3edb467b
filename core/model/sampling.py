"""One sampler loop for every way the project draws images beside the stock pipeline call.

``StableDiffusionPipeline.__call__`` draws with one UNet; the attacks and the live work need other
noise predictions at each step: extrapolated between the base and a fine-tuned model (FineXtract,
the attacker's sampling) and many LoRAs at once (a batch of visitors' previews and attacks, one
stacked forward per step). :func:`denoise` is the pipeline's own loop (its scheduler from the
model's config, ``scale_model_input``, ``step``; guidance 1, no extra kwargs) with the prediction
passed in; :func:`decode` is the pipeline's decoding. With the plain UNet as ``predict`` it draws
what ``sample_images`` draws (tests/test_sampling.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from core.model.pipeline import cpu_layout, initial_latents, private_view


@torch.no_grad()
def denoise(
    pipe, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], latents: torch.Tensor, steps: int
) -> torch.Tensor:
    """Run the pipeline's scheduler from ``latents`` (unscaled starting noise) with ``predict(x, t)``
    giving the model output at each step; returns the final latents."""
    sched = private_view(pipe).scheduler
    sched.set_timesteps(steps, device=pipe.device)
    lat = latents.to(pipe.device, pipe.unet.dtype) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.scale_model_input(lat, t)
        lat = sched.step(predict(x, t).to(lat.dtype), t, lat).prev_sample
    return lat


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, chunk: int = 32) -> list[np.ndarray]:
    """Latents -> uint8 RGB images, as the pipeline decodes them (channels-last on a CPU: the embedded
    autoencoder decodes a 128 px image in 0.055 s instead of 0.068 s on one core)."""
    out = []
    for z in latents.split(chunk):
        img = pipe.vae.decode(cpu_layout(z.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor)).sample
        img = (img.float().clamp(-1, 1) + 1) / 2
        out += [(im.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8) for im in img]
    return out


def sample_with(pipe, predict, seeds, steps: int) -> list[np.ndarray]:
    """Images from ``predict`` starting at the noise of ``seeds`` (one CPU generator per seed)."""
    return decode(pipe, denoise(pipe, predict, initial_latents(pipe, list(seeds)), steps))


def stacked(forward, params: dict, embs: torch.Tensor, n: int, base_unet=None, w: float = 1.0):
    """K LoRAs at once: latents come in as (K n) x C x h x w, LoRA k predicts its n with prompt
    embedding ``embs[k]`` (L x D) through ``forward`` (``vmap(functional_call)`` over the stacked
    ``params``, :class:`core.finetune.batch.LoRABatch`'s). With ``base_unet`` and ``w`` != 1 each
    prediction is extrapolated away from the base model's for the same embedding."""

    def predict(x, t):
        k = len(embs)
        xs = x.view(k, n, *x.shape[1:])
        e = embs.to(x.device, x.dtype)[:, None].expand(k, n, *embs.shape[1:])
        tt = t.reshape(1).expand(k, n) if torch.is_tensor(t) else torch.full((k, n), t, device=x.device)
        f = forward(params, xs, tt, e).reshape(x.shape)
        if base_unet is None or w == 1:
            return f
        b = base_unet(x, tt.reshape(-1), e.reshape(k * n, *embs.shape[1:])).sample
        return b + w * (f - b)

    return predict
