"""DP-SGD fine-tuning, the training-time defense (:func:`dp_finetune`). Per-photo gradients (``vmap(grad)`` over the
LoRA weights as plain tensors), clipped (:func:`core.finetune.clipping.clip_per_sample`), summed, noised;
epsilon from Opacus' RDP accountant.

What is private: the visitor's photos (the class images are public). Each step:
1. Poisson sampling: every photo joins the batch independently with probability
   q = cfg.batch / n_photos (the batch size varies; q <= 1 needs cfg.batch <= n_photos); a
   joining photo is used as itself or its mirror image (coin flip), at a random timestep.
2. Per-photo gradients of the LoRA weights (``torch.func``: ``functional_call`` + ``vmap(grad)``),
   each clipped to L2 norm C = ``dp.max_grad_norm`` over all LoRA tensors together.
3. Their sum plus Gaussian noise of std sigma * C (sigma = ``dp.noise_multiplier``, or the sigma
   Opacus' ``get_noise_multiplier`` finds for ``dp.target_epsilon`` over cfg.steps), divided by
   the *expected* batch size cfg.batch.
4. Plus the prior-preservation gradient of cfg.batch class images (public, so neither clipped nor
   noised), then the recipe's AdamW step and global gradient clip (post-processing: no cost).
Epsilon is Opacus' RDP accountant (:func:`epsilon_curve`: the sampled Gaussian mechanism, whose
analysis assumes exactly this Poisson sampling at rate q) after the steps done, at ``dp.delta``;
never typed in. An upper bound: the true privacy loss may be smaller.
The seeded generator makes runs reproducible; it is not a cryptographically secure source
(like Opacus without ``secure_mode``).

What epsilon promises: it is **per photo** (sample-level DP). The LoRA hides whether any single
photo was in the set; it does not hide the person: a person with 5 photos in the set gets group
privacy of roughly 5 x epsilon (and a larger delta), and the LoRA's whole job is to learn that
person's face. Only the weights (and what is computed from them: checkpoints, previews) are
covered; the losses in ``Progress`` are computed from the photos without noise and are for the
visitor's eyes only.

UNet LoRA only (``cfg.text_encoder`` must be False); float32 (no autocast). The LoRA starts from
exactly the initialisation ``finetune`` uses with the same seed; the base pipeline is not modified.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass

import torch

from core.events import Checkpoint, Done, Message, Preview, Progress, never
from core.finetune.batch import adapter_unet, initial_adapters, peft_key
from core.finetune.clipping import clip_per_sample
from core.finetune.lora import (
    FinetuneConfig,
    FinetuneResult,
    check_photos,
    encode_photos,
    encode_prompt,
    pick_trigger,
    pipeline_with_lora,
)
from core.model.denoising import Denoiser, NoisedBatch
from core.model.pipeline import sample_images
from core.model.prior import base_fingerprint, class_latents
from core.model.prompts import CLASS_PROMPT, instance_prompt


@dataclass
class DPConfig:
    noise_multiplier: float = 1.0  # sigma: noise std / max_grad_norm on summed clipped grads (unless target_epsilon)
    max_grad_norm: float = 1.0  # C: each photo's gradient (all LoRA tensors together) is clipped to this L2 norm
    delta: float = 1e-5  # the delta of (epsilon, delta)-DP; keep it well below 1 / number of photos
    target_epsilon: float | None = None  # set: sigma is computed (Opacus) so the run ends at this epsilon

    def __post_init__(self):
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0 or None, got {self.target_epsilon!r}")


@dataclass
class DPFinetuneResult(FinetuneResult):
    dp: DPConfig | None = None
    noise_multiplier: float = 0.0  # sigma actually used (from target_epsilon when that was set)
    sample_rate: float = 0.0  # Poisson sampling rate q of the photos
    epsilon: float = math.inf  # from Opacus' RDP accountant after steps_done steps, at dp.delta


# Opacus warns when the best RDP order is its smallest or largest (very large or very small
# epsilon: the bound is loose there, but still a valid upper bound); not worth a warning per run.
_ORDER_WARNING = "Optimal order is the"


@functools.lru_cache(maxsize=64)
def epsilon_curve(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> tuple[float, ...]:
    """Epsilon after 1, 2, ..., ``steps`` steps of the sampled Gaussian mechanism (Poisson rate
    ``sample_rate``), by Opacus' RDP accountant: its orders (``RDPAccountant.DEFAULT_ALPHAS``) and
    analysis (``compute_rdp``, ``get_privacy_spent``), i.e. ``RDPAccountant.get_epsilon`` after
    that many ``step`` calls. RDP adds up over steps, so one step's RDP is computed once (the slow
    part: ~0.3 s) and each step costs a conversion only. Noise multiplier 0: inf."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    orders = RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ORDER_WARNING)
        one = analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders)
        return tuple(
            float(analysis.get_privacy_spent(orders=orders, rdp=one * k, delta=delta)[0]) for k in range(1, steps + 1)
        )


@functools.lru_cache(maxsize=64)
def _noise_for(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ORDER_WARNING)
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
            )
        )


def resolve_noise_multiplier(dp: DPConfig, sample_rate: float, steps: int) -> float:
    """``dp.noise_multiplier``, or with ``dp.target_epsilon`` the sigma Opacus'
    ``get_noise_multiplier`` finds (RDP, tolerance 0.01) so that ``steps`` steps end at that epsilon
    (a binary search of a few seconds; cached per (target, delta, rate, steps))."""
    if dp.target_epsilon is None:
        return float(dp.noise_multiplier)
    return _noise_for(float(dp.target_epsilon), float(dp.delta), float(sample_rate), int(steps))


def denoising_error(unet, params: dict, batch: NoisedBatch, emb: torch.Tensor) -> torch.Tensor:
    """Per-image denoising error (:meth:`core.model.denoising.Denoiser.errors`) of the UNet with
    LoRA weights ``params``."""
    from torch.func import functional_call

    pred = functional_call(unet, params, (batch.noisy, batch.t, emb.expand(len(batch), -1, -1))).sample
    return Denoiser.errors(pred, batch)


def per_sample_grads(unet, params: dict, batch: NoisedBatch, emb: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Gradients of each sample's own loss (``vmap(grad)``): ({name: B x shape}, losses B)."""
    from torch.func import grad_and_value, vmap

    def one(p, noisy, t, target, weight):
        return denoising_error(unet, p, NoisedBatch(noisy[None], t[None], target[None], weight[None]), emb)[0]

    return vmap(grad_and_value(one), in_dims=(None, 0, 0, 0, 0))(
        params, batch.noisy, batch.t, batch.target, batch.weight
    )


def clipped_per_sample_grads(unet, params: dict, batch: NoisedBatch, emb: torch.Tensor, max_grad_norm: float) -> dict:
    """Per-sample gradients clipped to ``max_grad_norm`` ({name: B x shape}): what DP-SGD sums."""
    return clip_per_sample(per_sample_grads(unet, params, batch, emb)[0], max_grad_norm)[0]


def private_gradient(
    unet,
    params: dict,
    inst: NoisedBatch,
    emb_inst: torch.Tensor,
    cls: NoisedBatch | None,
    emb_cls: torch.Tensor | None,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch: int,
    prior_weight: float,
    generator: torch.Generator,
) -> tuple[dict, dict]:
    """The gradient one DP-SGD step applies, and the step's statistics (``loss``, ``instance_loss``:
    the objective below; ``clipped``: share of sampled photos whose gradient was clipped).

    ``(sum_i clip_C(g_i) + N(0, (sigma C)^2 I)) / expected_batch`` over the sampled photos, plus
    ``prior_weight * grad(mean class-image loss)`` without clipping or noise (class images are the
    base model's own samples: public). With sigma = 0 and C = inf this is the ordinary gradient of
    ``sum_i loss_i / expected_batch + prior_weight * mean class loss``."""
    from torch.func import grad_and_value

    params = {n: p.detach() for n, p in params.items()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    inst_loss, clipped_share = torch.zeros(()), 0.0
    if len(inst):
        grads, losses = per_sample_grads(unet, params, inst, emb_inst)
        clipped, norms = clip_per_sample(grads, max_grad_norm)
        total = {n: g.sum(0) for n, g in clipped.items()}
        inst_loss, clipped_share = losses.sum().detach(), float((norms > max_grad_norm).float().mean())
    for g in total.values():
        g += noise_multiplier * max_grad_norm * torch.randn(g.shape, generator=generator).to(g.device)
        g /= expected_batch
    inst_loss = float(inst_loss) / expected_batch
    loss = inst_loss
    if cls is not None and len(cls):
        g_cls, l_cls = grad_and_value(lambda p: denoising_error(unet, p, cls, emb_cls).mean())(params)
        for n in total:
            total[n] += prior_weight * g_cls[n]
        loss += prior_weight * float(l_cls)
    return total, {"loss": loss, "instance_loss": inst_loss, "clipped": clipped_share}


def poisson_sample(n: int, rate: float, g: torch.Generator) -> torch.Tensor:
    """Indices of the photos in this step's batch: each one independently with probability ``rate``."""
    return (torch.rand(n, generator=g) < rate).nonzero().flatten()


def dp_step(
    unet,
    params: dict,
    opt,
    den: Denoiser,
    inst: torch.Tensor,
    cls: torch.Tensor | None,
    embs,
    q: float,
    sigma: float,
    dp: DPConfig,
    cfg: FinetuneConfig,
    g: torch.Generator,
) -> dict:
    """One DP-SGD step (steps 1-4 of the module docstring); returns its statistics."""
    n = len(inst) // 2  # photo i's latent is inst[i], its mirror image's inst[i + n]
    pick = poisson_sample(n, q, g)
    x_inst = inst[pick + n * torch.randint(0, 2, (len(pick),), generator=g)]
    x_cls = cls[torch.randint(0, len(cls), (cfg.batch,), generator=g)] if cls is not None else x_inst[:0]
    noised = den.noise(torch.cat([x_inst, x_cls]), g)
    m = len(pick)
    b_inst, b_cls = noised[:m], (noised[m:] if cls is not None else None)
    grads, stats = private_gradient(
        unet,
        params,
        b_inst,
        embs[0],
        b_cls,
        embs[1],
        noise_multiplier=sigma,
        max_grad_norm=dp.max_grad_norm,
        expected_batch=cfg.batch,
        prior_weight=cfg.prior_weight,
        generator=g,
    )
    for k, p in params.items():
        p.grad = grads[k]
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {**stats, "photos in batch": m}


def dp_photos(crops, cfg: FinetuneConfig) -> list:
    """The photos, checked (:func:`check_photos`); ValueError unless DP-SGD can train ``cfg`` on them."""
    if cfg.text_encoder:
        raise ValueError("dp_finetune trains UNet LoRAs only (text_encoder=False)")
    crops = check_photos(crops)
    n = len(crops)
    if cfg.batch > n:
        raise ValueError(
            f"DP-SGD samples each photo with rate batch / photos, so batch ({cfg.batch}) must not "
            f"exceed the number of photos ({n})"
        )
    return crops


def dp_checkpoint(pipe, lora: dict, cfg: FinetuneConfig, trigger: str, step: int, epsilon: float):
    """Generator: the ``Checkpoint`` of ``step``, then (with ``cfg.preview_n``) a ``Preview`` of the DP
    LoRA's own samples with its trigger."""
    yield Checkpoint(step, lora)
    if cfg.preview_n:
        ims = sample_images(
            pipeline_with_lora(pipe, lora, cfg.alpha),
            instance_prompt(trigger),
            n=cfg.preview_n,
            seed=0,
            steps=cfg.preview_steps,
        )
        yield Preview(step, ims, f"the DP LoRA's own samples with its trigger, step {step} (epsilon {epsilon:.3g})")


def dp_finetune(pipe, crops, cfg: FinetuneConfig | None = None, dp: DPConfig | None = None, should_stop=never):
    """Generator: :func:`core.finetune.lora.finetune`'s recipe trained with DP-SGD; same events
    (``Message``, ``Progress`` per step with ``loss`` and the current ``epsilon``, ``Checkpoint`` /
    ``Preview`` every ``cfg.checkpoint_every`` steps, ``Done(DPFinetuneResult)``).

    The recipe, and what epsilon promises: the module docstring.
    """
    cfg = cfg or FinetuneConfig()
    dp = dp or DPConfig()
    crops = dp_photos(crops, cfg)
    n = len(crops)
    t0 = time.perf_counter()
    trigger = pick_trigger(cfg)
    dev = pipe.device
    q = cfg.batch / n
    sigma = resolve_noise_multiplier(dp, q, cfg.steps)
    epsilons = epsilon_curve(sigma, q, cfg.steps, dp.delta)

    # 1. inputs computed once (photo i's latent is inst[i], its mirror image's inst[i + n])
    inst = encode_photos(pipe, crops)
    cls = class_latents(pipe, cfg.n_class).to(dev) if cfg.prior_weight > 0 and cfg.n_class > 0 else None
    with torch.no_grad():
        emb_inst = encode_prompt(pipe, instance_prompt(trigger))
        emb_cls = encode_prompt(pipe, CLASS_PROMPT)
    yield Message(
        f"trigger word: {trigger}; {n} photos; {0 if cls is None else len(cls)} class images; "
        f"DP-SGD: sampling rate {q:.3g}, noise multiplier {sigma:.4g}, clip {dp.max_grad_norm:g}, "
        f"epsilon after {cfg.steps} steps {epsilons[-1]:.4g} (delta {dp.delta:g}, per photo)"
    )

    # 2. the LoRA weights as plain tensors, run through a frozen adapter UNet with functional_call
    unet = adapter_unet(pipe, cfg)
    params = {k: v[0].to(dev).requires_grad_(True) for k, v in initial_adapters(pipe, cfg, [cfg.seed]).items()}
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)
    den = Denoiser(pipe.scheduler.config)
    g = torch.Generator().manual_seed(cfg.seed)

    def current_lora():
        return {peft_key(k): v.detach().float().cpu().clone() for k, v in params.items()}

    # 3. steps
    losses, epsilon = [], 0.0
    for step in range(1, cfg.steps + 1):
        if should_stop():
            break
        stats = dp_step(unet, params, opt, den, inst, cls, (emb_inst, emb_cls), q, sigma, dp, cfg, g)
        m = stats.pop("photos in batch")
        epsilon = epsilons[step - 1]  # the accountant after `step` steps at rate q and noise sigma
        losses.append(stats["loss"])
        yield Progress(
            "DP fine-tune",
            step,
            cfg.steps,
            time.perf_counter() - t0,
            {**stats, "epsilon": epsilon, "photos in batch": m},
        )
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            yield from dp_checkpoint(pipe, current_lora(), cfg, trigger, step, epsilon)
    result = DPFinetuneResult(
        current_lora(),
        trigger,
        cfg,
        base_fingerprint(pipe),
        losses,
        time.perf_counter() - t0,
        len(losses),
        dp=dp,
        noise_multiplier=sigma,
        sample_rate=q,
        epsilon=epsilon,
    )
    yield Done(result, cancelled=len(losses) < cfg.steps)
