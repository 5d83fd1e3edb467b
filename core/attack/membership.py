"""Membership inference: was this photo in the LoRA's training set?

A fine-tune lowers the model's denoising loss most on the very photos it trained on (Carlini et al.
2023; SecMI and PIA read the same signal from a diffusion model's step errors). The base model is the
natural reference (as in reference-model attacks): it never saw the photo, so how much *more* easily
the LoRA's model denoises a photo than the base does is the evidence. The score:

    score(photo) = mean over fixed draws d of  log L_base(photo, d) - log L_LoRA(photo, d)

where a draw d is a (timestep, noise) pair fixed once by ``MembershipConfig.seed`` (the same for every
photo and every LoRA), L is the plain squared error of the model's prediction (epsilon or v: the
target comes from :class:`core.model.denoising.Denoiser`), the photo is encoded as the fine-tune
encodes it (and mirrored, since the fine-tune trains on mirror images too), and the prompt is the
class prompt, which needs no trigger (an uploaded LoRA's trigger is unknown). A positive score: the
LoRA fits this photo better than the base does.

A score alone has no scale, so it is read against a threshold *calibrated* on LoRAs of people the
evaluation never uses (:mod:`core.studies.membership`): the threshold is the score that only
``fpr`` (5 %) of photos *not* in a LoRA's training set (other photos of the same person) exceed.
:func:`auc` is the ROC AUC (Mann-Whitney U / n_pos n_neg, scipy).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from core.model.denoising import Denoiser
from core.model.prompts import CLASS_PROMPT


@dataclass
class MembershipConfig:
    timesteps: tuple[int, ...] = (100, 200, 300, 400, 500, 600)  # timesteps of the draws (chosen on tuning people)
    noises: int = 4  # noise draws per timestep (each photo and each LoRA sees the same ones)
    mirror: bool = True  # also score the mirror image (the fine-tune trains on both)
    seed: int = 0  # seeds the fixed noises
    batch: int = 64  # UNet inputs per forward pass (memory, not results)

    def __post_init__(self):
        self.timesteps = tuple(int(t) for t in self.timesteps)
        if not self.timesteps or any(not 0 <= t < 1000 for t in self.timesteps):
            raise ValueError(f"timesteps must be a non-empty list of 0..999, got {self.timesteps!r}")
        if not 1 <= self.noises <= 64:
            raise ValueError(f"noises must be 1..64, got {self.noises!r}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch!r}")


def _latents(pipe, crops, mirror: bool) -> torch.Tensor:
    from core.finetune.lora import encode_photos

    crops = [np.asarray(c, np.uint8) for c in crops]
    if not crops:
        return torch.zeros(0)
    z = encode_photos(pipe, crops)  # N photos then their N mirror images
    return z if mirror else z[: len(crops)]


@torch.no_grad()
def photo_losses(pipe, unet, crops, cfg: MembershipConfig | None = None) -> np.ndarray:
    """Per photo and draw, the plain squared error of ``unet`` (N x draws; mirror images are extra draws)."""
    cfg = cfg or MembershipConfig()
    n = len(crops)
    z = _latents(pipe, crops, cfg.mirror)
    if n == 0:
        return np.zeros((0, len(cfg.timesteps) * cfg.noises))
    views = len(z) // n
    den = Denoiser(pipe.scheduler.config)
    g = torch.Generator().manual_seed(cfg.seed)
    k = len(cfg.timesteps) * cfg.noises
    t = torch.tensor(cfg.timesteps).repeat_interleave(cfg.noises)
    noise = torch.randn((k, *z.shape[1:]), generator=g)  # the same draws for every photo
    emb = _class_embedding(pipe)
    x = z.repeat_interleave(k, 0)  # photo-major: (view, photo) x draw
    b = den.noise(x, t=t.repeat(len(z)), noise=noise.repeat(len(z), 1, 1, 1))
    errs = []
    for s in range(0, len(x), cfg.batch):
        part = b[s : s + cfg.batch]
        pred = unet(part.noisy, part.t, emb.expand(len(part), -1, -1)).sample
        errs.append((pred.float() - part.target.float()).pow(2).mean(dim=(1, 2, 3)).cpu())
    e = torch.cat(errs).view(views, n, k)  # view 0: the photos, view 1: their mirror images
    return e.permute(1, 0, 2).reshape(n, views * k).double().numpy()


def _class_embedding(pipe) -> torch.Tensor:
    from core.finetune.lora import encode_prompt

    return encode_prompt(pipe, CLASS_PROMPT)


def scores_from_losses(base: np.ndarray, lora: np.ndarray) -> np.ndarray:
    """The membership score of each photo: mean over draws of log L_base - log L_LoRA."""
    tiny = 1e-12
    return (np.log(np.asarray(base) + tiny) - np.log(np.asarray(lora) + tiny)).mean(axis=1)


def membership_scores(
    pipe,
    lora: dict,
    crops,
    cfg: MembershipConfig | None = None,
    alpha: float | None = None,
    base_losses: np.ndarray | None = None,
    model=None,
) -> np.ndarray:
    """The score of every photo in ``crops`` for ``lora`` (peft naming, merged with ``alpha``; or its
    already merged pipeline ``model``). ``base_losses``: the base model's :func:`photo_losses` of the same
    photos with the same config, when already computed (they do not depend on the LoRA)."""
    from core.finetune.lora import pipeline_with_lora

    cfg = cfg or MembershipConfig()
    if base_losses is None:
        base_losses = photo_losses(pipe, pipe.unet, crops, cfg)
    model = model if model is not None else pipeline_with_lora(pipe, lora, alpha)
    return scores_from_losses(base_losses, photo_losses(pipe, model.unet, crops, cfg))


# reading a score -----------------------------------------------------------------------------------


def auc(positives, negatives) -> float:
    """ROC AUC of scores: the chance that a random positive scores above a random negative (ties half)."""
    from scipy.stats import mannwhitneyu

    p, q = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    if len(p) == 0 or len(q) == 0:
        return float("nan")
    return float(mannwhitneyu(p, q, alternative="two-sided").statistic / (len(p) * len(q)))


def threshold_at_fpr(negatives, fpr: float = 0.05) -> float:
    """The score that a share ``fpr`` of the negatives exceed (their (1 - fpr) quantile)."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr!r}")
    return float(np.quantile(np.asarray(negatives, np.float64), 1 - fpr))


@dataclass
class Calibration:
    """A threshold for one base model and recipe, measured on LoRAs of people no evaluation uses."""

    threshold: float  # scores above it: "this LoRA was probably trained on this photo"
    fpr_target: float  # share of non-member photos (same person, unseen) above the threshold on the calibration LoRAs
    tpr: float  # share of member photos above it on the calibration LoRAs
    fpr_other: float  # share of other people's photos above it on the calibration LoRAs
    n_loras: int
    base: str  # fingerprint of the base model it was measured on
    steps: int  # fine-tuning steps of the calibration LoRAs (the default recipe's)
    config: dict = field(default_factory=dict)  # the MembershipConfig of the scores

    def above(self, score: float) -> bool:
        return bool(score > self.threshold)


def calibrate(
    members, unseen, others, fpr: float, base: str, steps: int, n_loras: int, cfg: MembershipConfig
) -> Calibration:
    thr = threshold_at_fpr(unseen, fpr)
    rate = lambda s: float(np.mean(np.asarray(s) > thr)) if len(s) else float("nan")
    return Calibration(thr, fpr, rate(members), rate(others), n_loras, base, steps, asdict(cfg))


def load_calibration(report: dict | None, base: str) -> tuple[Calibration | None, str]:
    """(the calibration in a membership study's report if it was measured on base ``base``, else None,
    and a sentence saying why not)."""
    if not report or "calibration" not in report:
        return None, "The membership check has not been calibrated yet (run `python -m core.studies.membership`)."
    c = dict(report["calibration"])
    if c.get("base") != base:
        return None, (
            f"The membership threshold was calibrated on another base model ({c.get('base')}; this one is "
            f"{base}): rerun `python -m core.studies.membership` on this base."
        )
    c["config"] = dict(c.get("config") or {})
    return Calibration(**c), ""


def config_of_calibration(cal: Calibration) -> MembershipConfig:
    return MembershipConfig(
        **{**cal.config, "timesteps": tuple(cal.config.get("timesteps", MembershipConfig.timesteps))}
    )


def roc_curve(positives, negatives) -> tuple[list[float], list[float]]:
    """(false-positive rates, true-positive rates) of every threshold, from (0, 0) to (1, 1)."""
    p, q = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    thr = np.unique(np.concatenate([p, q]))[::-1]
    fpr = [0.0] + [float(np.mean(q >= t)) for t in thr]
    tpr = [0.0] + [float(np.mean(p >= t)) for t in thr]
    return fpr, tpr
