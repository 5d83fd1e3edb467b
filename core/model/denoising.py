"""The denoising training step every trainer of the project shares.

Noising and targets come from diffusers' ``DDPMScheduler`` built from the model's own scheduler
config (``add_noise``; ``get_velocity`` for v-prediction), so the base model, a visitor's LoRA, the
shadow population, the watermarks and DP-SGD all train on exactly what the sampler inverts. The
loss weights are min-SNR-gamma (Hang et al. 2023): ``min(snr, gamma) / snr`` for epsilon
prediction, ``min(snr, gamma) / (snr + 1)`` for v-prediction; ``gamma = 0`` gives plain MSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def training_scheduler(scheduler_config) -> DDPMScheduler:  # noqa: F821
    """A ``DDPMScheduler`` with the noise schedule and prediction type of a pipeline's scheduler
    (its config or the scheduler itself)."""
    from diffusers import DDPMScheduler

    cfg = getattr(scheduler_config, "config", scheduler_config)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    return DDPMScheduler(**{k: cfg[k] for k in keys if k in cfg})


@dataclass(frozen=True)
class NoisedBatch:
    """Clean latents noised at timesteps ``t`` and the target the UNet must predict."""

    noisy: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor  # per-sample loss weight (min-SNR)

    def __len__(self) -> int:
        return len(self.noisy)

    def __getitem__(self, rows) -> NoisedBatch:
        """The same batch restricted to ``rows`` (a slice or index tensor)."""
        return NoisedBatch(self.noisy[rows], self.t[rows], self.target[rows], self.weight[rows])


class Denoiser:
    """Noises latents and scores predictions for one noise schedule (cached per device)."""

    def __init__(self, scheduler_config, min_snr_gamma: float = 0.0):
        self.sched = training_scheduler(scheduler_config)
        self.prediction = self.sched.config.prediction_type
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction!r}")
        self.gamma = float(min_snr_gamma)
        self.T = self.sched.config.num_train_timesteps
        ab = self.sched.alphas_cumprod.double()
        snr = ab / (1 - ab)
        if self.gamma > 0:
            w = snr.clamp(max=self.gamma) / (snr + 1 if self.prediction == "v_prediction" else snr)
        else:
            w = torch.ones_like(snr)
        self.weights = w.float()

    def draw(self, shape, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The timesteps and noise that :meth:`noise` draws for latents of ``shape`` when given neither,
        in its order (timesteps, then noise), on the CPU: a caller that noises several batches in one
        call (the batch trainer) draws each batch's with its own generator and passes them in."""
        t = torch.randint(0, self.T, (shape[0],), generator=generator)
        return t, torch.randn(shape, generator=generator, dtype=torch.float32)

    def noise(
        self,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> NoisedBatch:
        """Draw timesteps and noise (on the CPU generator, so runs repeat across devices) unless given."""
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        t, noise = t.to(x0.device), noise.to(x0.device, x0.dtype)
        noisy = self.sched.add_noise(x0, noise, t)
        target = noise if self.prediction == "epsilon" else self.sched.get_velocity(x0, noise, t)
        return NoisedBatch(noisy, t, target, self.weights.to(x0.device)[t])

    @staticmethod
    def errors(pred: torch.Tensor, batch: NoisedBatch, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample weighted squared error; ``mask`` (N x 1 x H x W in [0, 1]) restricts it to the
        latent pixels that come from a real photo."""
        se = (pred.float() - batch.target.float()).pow(2)
        if mask is None:
            per = se.mean(dim=tuple(range(1, se.dim())))
        else:
            m = mask.to(se.dtype).expand_as(se)
            per = (se * m).sum(dim=tuple(range(1, se.dim()))) / m.sum(dim=tuple(range(1, se.dim()))).clamp_min(1.0)
        return per * batch.weight

    def loss(
        self,
        unet,
        x0: torch.Tensor,
        emb: torch.Tensor,
        generator: torch.Generator | None = None,
        mask: torch.Tensor | None = None,
        **noise_kw,
    ) -> torch.Tensor:
        """Mean weighted denoising loss of ``unet`` on clean latents ``x0`` with prompt embeddings ``emb``."""
        b = self.noise(x0, generator, **noise_kw)
        pred = unet(b.noisy, b.t, emb).sample
        return self.errors(pred, b, mask).mean()
