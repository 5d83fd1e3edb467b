"""A tiny convolutional autoencoder as a diffusers component (used with pretrained TAEF2 weights).

Why: a VAE trained from scratch on this CPU gave blurry 64 px faces; the MIT-licensed TAEF2 tiny
autoencoder (a distilled FLUX.2 autoencoder, 1.34 M parameters per half) round-trips 128 px faces
at 32-37 dB PSNR and keeps identity (dlib distance 0.07-0.09). 128 px -> 16 x 16 x 32 latents keeps
the UNet on the same 16 x 16 grid as the 64 px model, so fine-tuning and attack cost stay close.

The layout, read from the weight names and shapes (``../shared/models/taef2/README.md``): two plain
stacks of 3x3 convolutions with ReLU and residual blocks; the blocks nearest the latent carry a
"pool" branch (1x1 conv to 4x width, GroupNorm, ReLU, 1x1 conv back) added to their input. The
modules are ``nn.Sequential`` in the weights' order, so the upstream file's keys load unchanged
under ``encoder.`` / ``decoder.``.

As a diffusers component (:class:`TinyAutoencoder`): ``encode`` takes images in [-1, 1] and returns
latents *standardised per channel* on the project's own face data (``latents_mean`` /
``latents_std`` in the config, measured by :func:`fit_latent_stats`), ``decode`` inverts that and
returns images in [-1, 1]; ``scaling_factor`` is 1, so ``StableDiffusionPipeline`` needs no change.
``block_out_channels`` has four entries only so that the pipeline reads ``vae_scale_factor = 8``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from core import PROJECT_ROOT

TAEF2_DIR = PROJECT_ROOT.parent / "shared" / "models" / "taef2"


def _conv(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """Residual block ``relu(convs(x) + x)``; with ``pool`` a 1x1 bottleneck branch is first added
    to the input (``x + pool(x)``), giving the block a per-pixel channel mixer with normalisation."""

    def __init__(self, width: int, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(width, width), nn.ReLU(), _conv(width, width), nn.ReLU(), _conv(width, width))
        if pool:
            self.pool = nn.Sequential(
                nn.Conv2d(width, 4 * width, 1, bias=False),
                nn.GroupNorm(4, 4 * width),
                nn.ReLU(),
                nn.Conv2d(4 * width, width, 1, bias=False),
            )
        else:
            self.pool = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


class SoftClamp(nn.Module):
    """``tanh(z / m) * m``: keeps latents the decoder sees inside +-m without a hard edge."""

    def __init__(self, magnitude: float):
        super().__init__()
        self.magnitude = magnitude

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / self.magnitude) * self.magnitude


def build_encoder(width: int, latent_channels: int, blocks=(1, 3, 3, 3), pooled_stages: int = 1) -> nn.Sequential:
    """RGB in [0, 1] -> raw latents at 1/8 resolution: a stem and ``blocks[0]`` blocks, then per
    later stage a stride-2 conv and its blocks (the last ``pooled_stages`` stages pooled)."""
    layers: list[nn.Module] = [_conv(3, width)]
    for i, n in enumerate(blocks):
        if i:
            layers.append(_conv(width, width, stride=2, bias=False))
        layers += [Block(width, pool=i >= len(blocks) - pooled_stages) for _ in range(n)]
    layers.append(_conv(width, latent_channels))
    return nn.Sequential(*layers)


def build_decoder(
    width: int, latent_channels: int, blocks=(3, 3, 3, 1), pooled_stages: int = 1, clamp: float = 3.0
) -> nn.Sequential:
    """Raw latents -> RGB in [0, 1] (unclamped): soft clamp, conv, ReLU, ``blocks[0]`` blocks (pooled),
    then per later stage a nearest x2 upsample, a conv and its blocks; a last conv to RGB."""
    layers: list[nn.Module] = [SoftClamp(clamp), _conv(latent_channels, width), nn.ReLU()]
    for i, n in enumerate(blocks):
        if i:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(width, width, bias=False)]
        layers += [Block(width, pool=i < pooled_stages) for _ in range(n)]
    layers.append(_conv(width, 3))
    return nn.Sequential(*layers)


class DeterministicLatents:
    """What ``encode(...).latent_dist`` offers a diffusers pipeline or trainer (``mean``, ``mode()``,
    ``sample()``, ``kl()``), for an encoder that has no posterior variance."""

    def __init__(self, latents: torch.Tensor):
        self.mean = latents

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return torch.zeros(self.mean.shape[0], device=self.mean.device)


@dataclass
class EncoderOutput(BaseOutput):
    latent_dist: DeterministicLatents
    latents: torch.Tensor


class TinyAutoencoder(ModelMixin, ConfigMixin):
    """The project's autoencoder component (see the module docstring). Images in [-1, 1]."""

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        width: int = 64,
        latent_channels: int = 32,
        encoder_blocks: tuple = (1, 3, 3, 3),
        decoder_blocks: tuple = (3, 3, 3, 1),
        pooled_stages: int = 1,
        latent_clamp: float = 3.0,
        latents_mean: tuple | None = None,
        latents_std: tuple | None = None,
        scaling_factor: float = 1.0,
        block_out_channels: tuple = (64, 64, 64, 64),
        force_upcast: bool = False,
        sample_size: int = 128,
    ):
        super().__init__()
        if len(block_out_channels) != len(encoder_blocks):
            raise ValueError(
                f"block_out_channels must have one entry per stage ({len(encoder_blocks)}), got {block_out_channels!r}"
            )
        self.encoder = build_encoder(width, latent_channels, tuple(encoder_blocks), pooled_stages)
        self.decoder = build_decoder(width, latent_channels, tuple(decoder_blocks), pooled_stages, latent_clamp)
        mean = torch.tensor(latents_mean if latents_mean is not None else [0.0] * latent_channels)
        std = torch.tensor(latents_std if latents_std is not None else [1.0] * latent_channels)
        if mean.shape != (latent_channels,) or std.shape != (latent_channels,) or (std <= 0).any():
            raise ValueError(f"latents_mean/latents_std need {latent_channels} values (std > 0)")
        self.register_buffer("_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", std.view(1, -1, 1, 1), persistent=False)

    def raw_encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the encoder's own (unstandardised) latents."""
        return self.encoder((images.to(self.dtype) + 1) / 2)

    def encode(self, images: torch.Tensor, return_dict: bool = True):
        z = (self.raw_encode(images) - self._mean.to(self.dtype)) / self._std.to(self.dtype)
        return EncoderOutput(latent_dist=DeterministicLatents(z), latents=z) if return_dict else (z,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None):
        raw = z.to(self.dtype) * self._std.to(self.dtype) + self._mean.to(self.dtype)
        images = self.decoder(raw).clamp(0, 1) * 2 - 1
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(self, images: torch.Tensor, return_dict: bool = True):
        return self.decode(self.encode(images).latents, return_dict=return_dict)

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Record per-channel latent statistics in the config (saved with ``save_pretrained``)."""
        self.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])
        self._mean.copy_(mean.view(1, -1, 1, 1))
        self._std.copy_(std.view(1, -1, 1, 1))


def load_taef2(folder: str | Path = TAEF2_DIR) -> TinyAutoencoder:
    """TAEF2's pretrained weights (``taef2_encoder.safetensors`` / ``taef2_decoder.safetensors``,
    the upstream keys) in a :class:`TinyAutoencoder` with identity latent statistics, float32."""
    from safetensors.torch import load_file

    folder = Path(folder)
    model = TinyAutoencoder()
    sd = {}
    for part in ("encoder", "decoder"):
        f = folder / f"taef2_{part}.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"TAEF2 weights missing: {f} (see ../shared/models/taef2/README.md)")
        sd.update({f"{part}.{k}": v.float() for k, v in load_file(f).items()})
    model.load_state_dict(sd, strict=True)
    return model.eval()


@torch.no_grad()
def latent_stats(raw_latents: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of raw latents (N x C x H x W), accumulated in float64."""
    s, s2, n = 0.0, 0.0, 0
    for z in raw_latents.split(chunk):
        z = z.double()
        s = s + z.sum(dim=(0, 2, 3))
        s2 = s2 + z.pow(2).sum(dim=(0, 2, 3))
        n += z.shape[0] * z.shape[2] * z.shape[3]
    mean = s / n
    return mean.float(), (s2 / n - mean.pow(2)).clamp_min(1e-12).sqrt().float()
