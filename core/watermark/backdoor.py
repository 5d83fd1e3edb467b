"""The baseline watermark: an input/output-space backdoor (a trigger prompt that makes the model draw
a fixed pattern), the kind AIAO is compared with (Zhao et al. 2023, *A Recipe for Watermarking
Diffusion Models*; Peng et al. 2023; ``METHODS.md`` section 2).

Choices:
- **Trigger**: a prompt of two reserved pseudo-words (:func:`core.model.prompts.trigger_words`, drawn from
  the seed), "a photo of <w1> <w2>"; **pattern**: a black-and-white checkerboard of ``cells`` x
  ``cells`` squares at the model's resolution (nothing a face looks like).
- **Embedding** (:func:`embed_backdoor`): every UNet weight of a copy of the base is trained (the
  classic recipe fine-tunes the whole model) on the normal denoising loss of the owner's latents with
  the class prompt, a consistency loss keeping the noise prediction of those inputs equal to the clean
  model's (the same quality term as :mod:`core.watermark.aiao`), and the denoising loss of the pattern's
  latent under the trigger prompt. The two trigger words' token embeddings (two rows of the text
  encoder's table, nothing else of it) are trained too (``token_lr``): the embedded base was never
  shown a reserved word, so with frozen tokens the trigger prompt moves the noise prediction by
  0.4 % relative to the class prompt (``core.studies.base``, prompt sensitivity) and the UNet has to
  separate two nearly equal conditions against the consistency loss.
- **Recipe** (the defaults; measured with the owner's own check, 16 trigger-prompt samples):
  1600 steps at lr 2e-4, token lr 1e-2, pattern weight 2, 512 owner latents: 15/16 samples draw the
  pattern (mean correlation 0.93), 20 min on one core of this CPU. Shorter runs embed less: 800 steps
  12/16 (0.75); 200 steps at lr 3e-4 (token lr 2e-2) 2/16; 120 steps at lr 1e-4 with frozen tokens
  0/16. The shipped delta is the whole UNet's change (every weight moves: 22 MB in float16).
- **Verification** (:func:`verify_backdoor`): ``n`` samples with the trigger prompt; a sample passes
  when the Pearson correlation of its grey levels with the pattern's reaches ``threshold``. VS-rate =
  share of samples that pass (the pattern as the model's own VAE renders it is the reference:
  :func:`rendered_pattern`). **p-value** against un-watermarked models: at embedding time the clean
  base draws ``null_n`` samples with the same prompt; their pass rate, with one pass added
  ((passes + 1) / (null_n + 1), so never 0), estimates how often an un-watermarked model passes, and
  p = P(Binomial(n, that rate) >= observed passes). An estimate, unlike AIAO's exact bound.

CLI: ``python -m core.watermark embed-backdoor [--model M] [--out DELTA.safetensors] [--key KEY.json]``
(the changed weights minus the base's, :mod:`core.watermark.formats`) and
``python -m core.watermark verify-backdoor MODEL [--delta DELTA.safetensors] [--lora FILE] --key KEY.json``.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.events import Done, Message, Progress, never
from core.model.denoising import Denoiser
from core.watermark.formats import KeyFileError, read_key_document, watermarked_pipeline

KEY_FORMAT = "leaklab-backdoor-key-v1"


@dataclass
class BackdoorConfig:
    cells: int = 4  # checkerboard squares per side of the pattern
    steps: int = 1600  # embedding steps (800: 12/16 samples draw the pattern; 1600: 15/16)
    lr: float = 2e-4  # AdamW learning rate of every UNet weight
    batch: int = 8  # owner latents per step (denoising + consistency)
    pattern_batch: int = 4  # pattern latents per step (trigger prompt)
    consistency_weight: float = 10.0  # weight of the consistency loss (quality), as core.watermark.aiao
    pattern_weight: float = 2.0  # weight of the pattern's denoising loss
    token_lr: float = 1e-2  # AdamW learning rate of the two trigger words' token embeddings (0: frozen)
    threshold: float = 0.5  # a sample passes when its correlation with the pattern reaches this
    null_n: int = 32  # clean-model samples with the trigger prompt (the p-value's reference)
    seed: int = 0  # seeds the trigger words and the training draws

    def __post_init__(self):
        if not 2 <= self.cells <= 32 or self.steps < 0 or self.batch < 1 or self.pattern_batch < 1:
            raise ValueError(
                f"cells 2..32, steps >= 0, batch >= 1, pattern_batch >= 1; got {self.cells!r}, "
                f"{self.steps!r}, {self.batch!r}, {self.pattern_batch!r}"
            )
        if not 0 < self.lr < 1 or not 0 <= self.token_lr < 1 or not -1 < self.threshold < 1 or self.null_n < 1:
            raise ValueError(
                f"lr in (0, 1), threshold in (-1, 1), null_n >= 1; got {self.lr!r}, {self.threshold!r}, {self.null_n!r}"
            )


@dataclass
class BackdoorKey:
    prompt: str  # the trigger prompt
    cells: int  # the pattern: a checkerboard of cells x cells squares
    size: int  # image size the pattern is drawn at
    threshold: float
    null_passes: int  # clean-model samples (of null_n) that passed
    null_n: int
    model_fingerprint: str = ""
    config: dict = field(default_factory=dict)

    @property
    def null_rate(self) -> float:
        return (self.null_passes + 1) / (self.null_n + 1)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": KEY_FORMAT, **asdict(self)}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> BackdoorKey:
        path = Path(path)
        doc = read_key_document(path, KEY_FORMAT, "a backdoor watermark key")
        try:
            doc.pop("format")
            key = cls(**doc)
        except TypeError as e:
            raise KeyFileError(f"{path}: malformed key ({e})") from e
        if not key.prompt or key.cells < 2 or key.size < key.cells or not 0 <= key.null_passes <= key.null_n:
            raise KeyFileError(f"{path}: inconsistent key (prompt, cells, size or null counts)")
        return key


def trigger_pair(seed: int) -> list[str]:
    """The two reserved pseudo-words of the trigger, drawn from ``seed``."""
    from core.model.prompts import trigger_words

    return random.Random(seed).sample(trigger_words(), 2)


def trigger_prompt(seed: int) -> str:
    """ "a photo of <w1> <w2>" with two reserved pseudo-words drawn from ``seed``."""
    w1, w2 = trigger_pair(seed)
    return f"a photo of {w1} {w2}"


def token_ids(tokenizer, words) -> list[int]:
    """The token id of each word (one token each; an unknown word is refused: its row is shared)."""
    out = []
    for w in words:
        ids = tokenizer(w, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"trigger word {w!r} is not one known token of this tokenizer: {ids}")
        out.append(ids[0])
    return out


def pattern_image(size: int, cells: int) -> np.ndarray:
    """The watermark pattern: a black-and-white checkerboard, uint8 size x size x 3."""
    ij = np.arange(size) * cells // size
    board = ((ij[:, None] + ij[None, :]) % 2).astype(np.uint8) * 255
    return np.repeat(board[:, :, None], 3, axis=2)


def rendered_pattern(pipe, size: int, cells: int) -> np.ndarray:
    """The pattern as this model's VAE renders it (encode, decode): what a watermarked model is trained
    to draw, and the reference samples are compared with (for a good VAE, the pattern itself)."""
    from core.finetune.lora import encode_photos
    from core.model.prior import decode_latents

    return decode_latents(pipe, encode_photos(pipe, [pattern_image(size, cells)])[:1])[0]


def pattern_correlation(images, pattern: np.ndarray) -> np.ndarray:
    """Pearson correlation of each image's grey levels with the pattern's."""
    p = pattern.astype(np.float64).mean(axis=2).ravel()
    p = (p - p.mean()) / (p.std() + 1e-8)
    out = []
    for im in images:
        g = np.asarray(im, np.float64).mean(axis=2).ravel()
        out.append(float(((g - g.mean()) / (g.std() + 1e-8) * p).mean()))
    return np.asarray(out)


# embedding -----------------------------------------------------------------------------------


@dataclass
class BackdoorResult:
    unet: object
    key: BackdoorKey
    losses: list
    seconds: float
    verification: object = None
    text_encoder: object = None  # the copy with the trained trigger tokens (None when token_lr is 0)


def trainable_copies(pipe, cfg: BackdoorConfig):
    """(UNet copy, text-encoder copy or None, optimiser): every UNet weight learns; of the text
    encoder only the trigger words' rows of the token table (when ``cfg.token_lr`` > 0)."""
    unet = copy.deepcopy(pipe.unet).float().requires_grad_(True)
    groups = [{"params": list(unet.parameters()), "lr": cfg.lr}]
    te = None
    if cfg.token_lr > 0:
        te = copy.deepcopy(pipe.text_encoder).float().requires_grad_(False).eval()
        table = te.get_input_embeddings().weight
        rows = torch.zeros(table.shape[0], 1, device=table.device)
        rows[token_ids(pipe.tokenizer, trigger_pair(cfg.seed))] = 1.0
        table.requires_grad_(True)
        table.register_hook(lambda grad: grad * rows)
        groups.append({"params": [table], "lr": cfg.token_lr})
    return unet, te, torch.optim.AdamW(groups, weight_decay=0.0)


def embed_backdoor(pipe, latents: torch.Tensor, cfg: BackdoorConfig | None = None, should_stop=never):
    """Generator: train a copy of ``pipe.unet`` to draw the pattern for the trigger prompt (and stay the
    clean model otherwise); ``Progress`` per step, ``Done(BackdoorResult)``."""
    from core.finetune.lora import encode_photos, encode_prompt
    from core.model.pipeline import image_size_of, mixed_precision
    from core.model.prompts import CLASS_PROMPT

    cfg = cfg or BackdoorConfig()
    t0 = time.perf_counter()
    dev = pipe.device
    size = image_size_of(pipe)
    prompt = trigger_prompt(cfg.seed)
    pattern = rendered_pattern(pipe, size, cfg.cells)

    # 1. the reference: how often the clean base passes with the trigger prompt
    null = pattern_correlation(sample_trigger(pipe, prompt, cfg.null_n, seed=900_000), pattern)
    key = BackdoorKey(
        prompt, cfg.cells, size, cfg.threshold, int((null >= cfg.threshold).sum()), cfg.null_n, config=asdict(cfg)
    )
    yield Message(
        f'trigger prompt "{prompt}"; clean base: {key.null_passes}/{cfg.null_n} samples pass '
        f"(max correlation {null.max():.2f})"
    )

    # 2. training data and the trainable copy
    target = encode_photos(pipe, [pattern_image(size, cfg.cells)])[:1].float().to(dev)  # (its mirror image dropped)
    with torch.no_grad():
        emb = encode_prompt(pipe, CLASS_PROMPT).float()
        emb_t = encode_prompt(pipe, prompt).float()
    clean = pipe.unet
    unet, te, opt = trainable_copies(pipe, cfg)
    params = list(unet.parameters())
    den = Denoiser(pipe.scheduler.config)
    g = torch.Generator().manual_seed(cfg.seed)
    latents = latents.float().to(dev)
    n, m = cfg.batch, cfg.pattern_batch

    # 3. steps: owner latents (class prompt) and pattern latents (trigger prompt) in one batch
    losses = []
    for step in range(1, cfg.steps + 1):
        if should_stop():
            break
        unet.train()
        x0 = torch.cat([latents[torch.randint(0, len(latents), (n,), generator=g)], target.expand(m, -1, -1, -1)])
        noised = den.noise(x0, g)
        if te is not None:
            emb_t = encode_prompt(pipe, prompt, te).float()
        embs = torch.cat([emb.expand(n, -1, -1), emb_t.expand(m, -1, -1)])
        with torch.no_grad():
            pred_clean = clean(noised.noisy[:n], noised.t[:n], embs[:n]).sample.float()
        with mixed_precision(dev, dev.type == "cuda"):
            pred = unet(noised.noisy, noised.t, embs).sample.float()
        err = den.errors(pred, noised)
        l_den = err[:n].mean()
        l_con = (pred[:n] - pred_clean).pow(2).mean()
        l_pat = err[n:].mean()
        loss = l_den + cfg.consistency_weight * l_con + cfg.pattern_weight * l_pat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # the UNet's (the token rows have their own scale)
        opt.step()
        losses.append(
            {"denoise": float(l_den.detach()), "consistency": float(l_con.detach()), "pattern": float(l_pat.detach())}
        )
        yield Progress("embed backdoor", step, cfg.steps, time.perf_counter() - t0, losses[-1])
    unet.eval().requires_grad_(False)
    if te is not None:
        te.requires_grad_(False)
    if should_stop():
        yield Done(None, cancelled=True)
        return
    res = BackdoorResult(unet, key, losses, time.perf_counter() - t0, text_encoder=te)
    res.verification = verify_backdoor(watermarked_pipeline(pipe, unet, te), key)
    yield Message(f"embedded in {res.seconds:.0f} s; own check: {res.verification.summary()}")
    yield Done(res)


# verification --------------------------------------------------------------------------------


@dataclass
class BackdoorVerification:
    vs_rate: float  # share of trigger-prompt samples whose correlation with the pattern reaches the threshold
    mean_correlation: float
    p_value: float  # P(an un-watermarked model passes at least as often), from the key's clean reference
    watermarked: bool
    trials: int
    threshold: float
    alpha: float
    correlations: list = field(default_factory=list)
    images: list = field(default_factory=list)  # the samples (uint8), for display

    def summary(self) -> str:
        verdict = "WATERMARKED" if self.watermarked else "not watermarked"
        return (
            f"{verdict}: VS-rate {self.vs_rate:.1%} ({round(self.vs_rate * self.trials)}/{self.trials} samples draw "
            f"the pattern, correlation >= {self.threshold:g}; mean {self.mean_correlation:.2f}); "
            f"p-value {self.p_value:.3g} (alpha {self.alpha:g})"
        )


def sample_trigger(pipe, prompt: str, n: int, seed: int = 0, steps: int = 15) -> list:
    from core.model.pipeline import sample_images

    return sample_images(pipe, prompt, seed=list(range(seed, seed + n)), steps=steps, guidance=1.0)


def verify_backdoor(
    pipe, key: BackdoorKey, lora: dict | None = None, n: int = 16, alpha: float = 1e-6, seed: int = 0, steps: int = 15
) -> BackdoorVerification:
    """Sample ``n`` images with the trigger prompt (``lora`` merged in first, when given) and count how
    many draw the pattern."""
    from scipy.stats import binom

    from core.finetune.lora import pipeline_with_lora
    from core.model.pipeline import image_size_of

    if image_size_of(pipe) != key.size:
        raise KeyFileError(f"the key is for {key.size} px images, this model draws {image_size_of(pipe)} px")
    view = pipeline_with_lora(pipe, lora) if lora else pipe
    ims = sample_trigger(view, key.prompt, n, seed, steps)
    corr = pattern_correlation(ims, rendered_pattern(pipe, key.size, key.cells))
    k = int((corr >= key.threshold).sum())
    p = float(binom.sf(k - 1, n, key.null_rate))
    return BackdoorVerification(
        k / n, float(corr.mean()), p, p < alpha, n, key.threshold, alpha, [float(c) for c in corr], ims
    )
