"""Photo cloaking: a protective adversarial perturbation of the visitor's photos, before they are online.

In the spirit of Anti-DreamBooth (Van Le et al., ICCV 2023): the fine-tune a thief would run
*minimises* the denoising loss of the model on the photos, so the cloak *maximises* that loss, by
projected gradient ascent (PGD, Madry et al.) on the pixels, through the autoencoder and the UNet,
within an L-infinity budget on the 0-255 image (no colour value of any pixel moves by more than
``budget``). The loss is :class:`core.model.denoising.Denoiser`'s, so it is the fine-tune's own loss
whether the base predicts epsilon or v.

Two surrogates (``CloakConfig.surrogate``):
- ``"lora"`` (the default): ASPL-style alternation. A surrogate LoRA (the fine-tune's own recipe:
  rank, targets, instance prompt) is trained for a few steps on the *current* cloaked photos, then
  PGD ascends *its* loss, and so on: the cloak is aimed at a model that has already started to learn
  the photos, as the thief's will have. ASPL (Anti-DreamBooth's ``attacks/aspl.py``) alternates
  that model (its f, trained on the perturbed photos) with a copy f' trained on the *clean* photos
  before each PGD round and attacks f'; it runs 50 rounds of 3 + 3 training and 6 PGD steps (300 PGD
  steps, budget 0.05 on its [-1, 1] image scale, about 6.4/255) on a GPU. Ours drops f' (half the
  surrogate's cost) and runs ``steps`` PGD steps in all: the "cheaper variant", whose time is in
  ``python -m bench.cloak_speed`` and whose effect is measured by ``core.studies.cloaking``.
- ``"base"``: PGD against the frozen base model only (no surrogate training; the cheapest).

Each PGD step draws fresh timesteps and noise (and mirrors a random half of the photos, as the
fine-tune trains on mirror images too): an expectation over the fine-tune's own randomness. The final
perturbation is rounded to whole 0-255 values and clipped to the budget, so the saved photo keeps
the promise exactly. :func:`cloak_photos` is a generator of :mod:`core.events` events, cancellable.

The visible cost: PSNR and SSIM of each cloaked photo against its original (:func:`psnr`,
:func:`ssim`; SSIM is Wang et al.'s with an 11-tap Gaussian window of sigma 1.5 per channel, written
here with scipy's Gaussian filter because scikit-image is not a dependency for one formula).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from core.events import Done, Message, Progress, never
from core.model.denoising import Denoiser
from core.model.pipeline import cpu_layout, events_on_cores, plain_attention
from core.model.prompts import instance_prompt, random_trigger

SURROGATES = ("lora", "base")


@dataclass
class CloakConfig:
    budget: float = 8.0  # L-infinity budget on the 0-255 image: no colour value of a pixel moves by more than this
    steps: int = 10  # PGD steps (signed gradient ascent on the denoising loss, projected on the budget)
    step_size: float | None = None  # PGD step on the 0-255 scale; None = 2.5 * budget / steps (Madry et al.'s rule)
    surrogate: str = "lora"  # "lora": a LoRA trained on the cloaked photos between rounds (ASPL); "base": frozen base
    surrogate_every: int = 5  # PGD steps per round; the surrogate LoRA trains before each round
    surrogate_steps: int = 3  # surrogate-LoRA training steps per round
    surrogate_lr: float = 3e-3  # the surrogate's AdamW learning rate (the fine-tune's)
    rank: int = 4  # the surrogate LoRA's rank
    noises: int = 1  # timestep/noise draws per photo per PGD step
    seed: int = 0  # seeds the random start, the draws and the surrogate's trigger and initialisation

    def __post_init__(self):
        if not 0 < self.budget <= 64:
            raise ValueError(f"budget must be in (0, 64] (0-255 scale), got {self.budget!r}")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be 1..1000, got {self.steps!r}")
        if self.step_size is not None and not 0 < self.step_size <= 64:
            raise ValueError(f"step_size must be in (0, 64] or None, got {self.step_size!r}")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {self.surrogate!r}")
        if self.surrogate_every < 1 or self.surrogate_steps < 0 or self.noises < 1 or self.rank < 1:
            raise ValueError(
                f"surrogate_every >= 1, surrogate_steps >= 0, noises >= 1, rank >= 1; got "
                f"{self.surrogate_every!r}, {self.surrogate_steps!r}, {self.noises!r}, {self.rank!r}"
            )
        if not 0 < self.surrogate_lr < 1:
            raise ValueError(f"surrogate_lr must be in (0, 1), got {self.surrogate_lr!r}")

    @property
    def alpha(self) -> float:
        """The PGD step on the 0-255 scale."""
        return self.step_size if self.step_size is not None else 2.5 * self.budget / self.steps


@dataclass
class CloakResult:
    originals: list  # uint8 H x W x 3, as given
    cloaked: list  # uint8 H x W x 3; |cloaked - original| <= budget for every value
    psnr: list  # dB, per photo, cloaked against original (higher = less visible)
    ssim: list  # per photo, cloaked against original (1 = identical)
    loss_clean: float  # the surrogate's denoising loss on the originals (fixed draws)
    loss_cloaked: float  # the same loss, same draws, on the cloaked photos
    config: CloakConfig = field(default_factory=CloakConfig)
    seconds: float = 0.0
    steps_done: int = 0


# the visible cost --------------------------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, dB (inf when equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004; Gaussian window, K1 0.01, K2 0.03) of two uint8
    images, the mean over pixels and channels."""
    from scipy.ndimage import gaussian_filter

    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    f = lambda im: gaussian_filter(im, sigma=(sigma, sigma, 0), truncate=3.5)  # 11-tap window, per channel
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


# the loss the cloak ascends ----------------------------------------------------------------------


def to_unit(crops) -> torch.Tensor:
    """uint8 crops -> N x 3 x H x W float in [-1, 1] (the autoencoder's input range)."""
    x = torch.from_numpy(np.stack([np.asarray(c, np.uint8) for c in crops])).permute(0, 3, 1, 2).float()
    return x.div(127.5).sub(1)


def to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    return list(((x.detach().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())


def encode(pipe, x: torch.Tensor) -> torch.Tensor:
    """Scaled latents (posterior means) of images in [-1, 1], differentiable in ``x``."""
    x = cpu_layout(x.to(pipe.device, pipe.vae.dtype))
    return pipe.vae.encode(x).latent_dist.mean.float() * pipe.vae.config.scaling_factor


def denoising_loss(
    unet,
    den: Denoiser,
    latents: torch.Tensor,
    emb: torch.Tensor,
    g: torch.Generator,
    noises: int = 1,
    flip: bool = True,
) -> torch.Tensor:
    """The fine-tune's loss on ``latents`` (``noises`` draws each; a random half mirrored when ``flip``)."""
    z = latents.repeat(noises, 1, 1, 1)
    if flip:
        mirror = torch.rand(len(z), generator=g) < 0.5
        z = torch.where(mirror.view(-1, 1, 1, 1).to(z.device), z.flip(-1), z)
    batch = den.noise(z, g)
    pred = unet(cpu_layout(batch.noisy), batch.t, emb.expand(len(z), -1, -1)).sample
    return den.errors(pred, batch).mean()


@torch.no_grad()
def fixed_loss(pipe, unet, crops, emb: torch.Tensor, seed: int = 1234, draws: int = 8) -> float:
    """Mean denoising loss of ``unet`` on ``crops`` over ``draws`` fixed (timestep, noise) pairs per
    photo (no mirroring): the same draws for every call with the same seed, so two photo sets compare."""
    den = Denoiser(pipe.scheduler.config)
    g = torch.Generator().manual_seed(seed)
    return float(denoising_loss(unet, den, encode(pipe, to_unit(crops)), emb, g, draws, flip=False))


class Surrogate:
    """The model the cloak ascends: a frozen copy of the base UNet (the shared one is never touched)
    and, with ``surrogate="lora"``, a LoRA of the fine-tune's recipe trained on the cloaked photos
    between PGD rounds. PGD runs through a copy with that LoRA *merged* (plain weights): peft's
    adapter layers made each input-gradient step 1.6x slower (718 vs 449 ms, 5 photos at 64 px)."""

    def __init__(self, pipe, cfg: CloakConfig):
        from core.finetune.lora import FinetuneConfig, lora_config

        self.pipe, self.cfg = pipe, cfg
        self.unet = copy.deepcopy(pipe.unet).requires_grad_(False).eval()
        self.trainer, self.params, self.opt = None, [], None
        if cfg.surrogate == "lora":
            torch.manual_seed(cfg.seed)
            self.trainer = copy.deepcopy(pipe.unet).requires_grad_(False)
            self.trainer.add_adapter(lora_config(FinetuneConfig(rank=cfg.rank, alpha=float(cfg.rank))))
            self.params = [p for p in self.trainer.parameters() if p.requires_grad]
            for p in self.params:
                p.data = p.data.float()
            self.opt = torch.optim.AdamW(self.params, lr=cfg.surrogate_lr, weight_decay=0.0)
        if pipe.device.type == "cpu":
            for u in (self.unet, self.trainer):
                if u is not None:
                    plain_attention(u)

    def learn(self, den: Denoiser, latents: torch.Tensor, emb: torch.Tensor, g: torch.Generator) -> None:
        """A few fine-tune steps of the surrogate LoRA on ``latents``, then merged into :attr:`unet`."""
        from core.finetune.lora import lora_state_dict, merge_lora_, split_components

        if self.trainer is None or not self.cfg.surrogate_steps:
            return
        self.trainer.train()
        for _ in range(self.cfg.surrogate_steps):
            loss = denoising_loss(self.trainer, den, latents, emb, g)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        self.trainer.eval()
        self.unet.load_state_dict(self.pipe.unet.state_dict())
        merge_lora_(self.unet, split_components(lora_state_dict(self.trainer))["unet"])


def cloak_photos(pipe, crops, cfg: CloakConfig | None = None, should_stop=never):
    """Generator: cloak ``crops`` (uint8 H x W x 3 at the model's resolution) against ``pipe``'s base.

    Yields ``Progress("cloak", step, steps, elapsed, {"loss": ...})`` per PGD step and
    ``Done(CloakResult)``; when ``should_stop()`` turns true it stops between steps and yields
    ``Done(result, cancelled=True)`` with the photos cloaked so far (still within the budget)."""
    from core.finetune.lora import encode_prompt

    cfg = cfg or CloakConfig()
    crops = [np.ascontiguousarray(np.asarray(c, np.uint8)) for c in crops]
    if not crops or any(c.shape != crops[0].shape or c.ndim != 3 for c in crops):
        raise ValueError(f"cloak_photos needs equal-size RGB crops, got shapes {sorted({c.shape for c in crops})}")
    t0 = time.perf_counter()
    eps, alpha = 2 * cfg.budget / 255, 2 * cfg.alpha / 255  # on the [-1, 1] scale
    den = Denoiser(pipe.scheduler.config)
    g = torch.Generator().manual_seed(cfg.seed)
    model = Surrogate(pipe, cfg)
    with torch.no_grad():
        emb = encode_prompt(pipe, instance_prompt(random_trigger(random.Random(cfg.seed))))
    x0 = to_unit(crops).to(pipe.device)
    delta = (torch.rand(x0.shape, generator=g) * 2 - 1).to(x0.device) * eps  # random start (Madry et al.)
    delta = ((x0 + delta).clamp(-1, 1) - x0).requires_grad_(True)
    yield Message(
        f"cloaking {len(crops)} photos: budget {cfg.budget:g}/255, {cfg.steps} PGD steps, surrogate {cfg.surrogate}"
    )
    done = 0
    for step in range(1, cfg.steps + 1):
        if should_stop():
            break
        if (step - 1) % cfg.surrogate_every == 0:
            with torch.no_grad():
                z = encode(pipe, x0 + delta)
            model.learn(den, z, emb, g)
        loss = denoising_loss(model.unet, den, encode(pipe, x0 + delta), emb, g, cfg.noises)
        (grad,) = torch.autograd.grad(loss, [delta])
        with torch.no_grad():  # ascend, then project on the budget and the valid pixel range
            delta += alpha * grad.sign()
            delta.clamp_(-eps, eps)
            delta.copy_((x0 + delta).clamp(-1, 1) - x0)
        done = step
        yield Progress("cloak", step, cfg.steps, time.perf_counter() - t0, {"loss": float(loss.detach())})
    cloaked = within_budget(crops, to_uint8(x0 + delta), cfg.budget)
    result = CloakResult(
        crops,
        cloaked,
        [psnr(c, o) for c, o in zip(cloaked, crops)],
        [ssim(c, o) for c, o in zip(cloaked, crops)],
        fixed_loss(pipe, model.unet, crops, emb),
        fixed_loss(pipe, model.unet, cloaked, emb),
        cfg,
        time.perf_counter() - t0,
        done,
    )
    yield Done(result, cancelled=done < cfg.steps)


def within_budget(originals, images, budget: float) -> list[np.ndarray]:
    """``images`` with every value clipped to ``original +- floor(budget)`` (and 0..255): the
    rounding to whole values never breaks the promise."""
    b = int(np.floor(budget))
    out = []
    for o, im in zip(originals, images):
        o16 = o.astype(np.int16)
        out.append(np.clip(im.astype(np.int16), np.maximum(o16 - b, 0), np.minimum(o16 + b, 255)).astype(np.uint8))
    return out


# what the app runs: cloak, then (optionally) purify as the attacker would ----------------------------


@dataclass
class Protected:
    cloak: CloakResult
    purified: list | None  # the cloaked photos after purification (None: not purified)
    purify_words: str = ""  # what the purification did, in words

    @property
    def photos(self) -> list:
        """What the fine-tune trains on: the purified photos if purified, else the cloaked ones."""
        return self.purified if self.purified is not None else self.cloak.cloaked


def protect_photos(pipe, crops, cfg: CloakConfig | None = None, purify_cfg=None, should_stop=never, cores: int = 0):
    """Generator: :func:`cloak_photos`'s events, then (with ``purify_cfg``, a
    :class:`core.defenses.purify.PurifyConfig`) the cloaked photos purified as an attacker would, and
    ``Done(Protected)``; cancelled: ``Done(None, cancelled=True)``. ``cores``: the cloak computes in
    a thread of its own on that many cores (:func:`core.model.pipeline.events_on_cores`; 0: in the
    calling thread), e.g. :meth:`core.engine.Engine.free_cores` in the app (``python -m
    bench.cloak_speed`` times 1 and 2 cores)."""
    from core.defenses.purify import purify

    result = None
    for ev in events_on_cores(lambda stop: cloak_photos(pipe, crops, cfg, stop), cores, should_stop):
        if isinstance(ev, Done):
            if ev.cancelled:
                yield Done(None, cancelled=True)
                return
            result = ev.result
        else:
            yield ev
    purified = purify(result.cloaked, purify_cfg) if purify_cfg is not None else None
    if purified is not None:
        yield Message(f"purified as an attacker would: {purify_cfg.words()}")
    yield Done(Protected(result, purified, purify_cfg.words() if purify_cfg is not None else ""))


def with_budget(cfg: CloakConfig, budget: float) -> CloakConfig:
    """The same cloak at another budget (a step size left to the rule scales with it)."""
    return replace(cfg, budget=float(budget))
