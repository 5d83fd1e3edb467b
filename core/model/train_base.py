"""Train the embedded miniature Stable Diffusion: ``python -m core.model.train_base``.

Stages (each resumable; state lives in ``--work`` outside the repo, the final pipeline in ``--out``):
1. photos      - LFW's *pretrain* identities (victims and shadow identities are never seen) and
                 UTKFace (23,317 unique chips: ages 0-116, five ethnic groups, both genders) minus a
                 fixed held-out set, every photo aligned exactly like a visitor's upload
                 (:mod:`core.faces.aligned`) at 128 px; photos where dlib finds no face are skipped
                 and counted. The inside-the-photo mask of each crop is kept: where a tightly framed
                 chip had to be extended by mirroring, the loss ignores those pixels.
2. descriptors - dlib descriptors of every crop. UTKFace holds public figures, so a chip whose
                 descriptor lies within ``--exclude-distance`` of an LFW victim's or shadow
                 identity's mean descriptor is dropped (they must stay unseen by the base model).
3. words       - appearance words per crop (:func:`appearance_labels`).
4. latents     - the pretrained TAEF2 autoencoder (:mod:`core.model.autoencoder`) encodes every crop
                 and its mirror image; latents are standardised per channel
                 (statistics stored in the autoencoder's config).
5. unet        - UNet2DConditionModel + the CLIP text encoder trained jointly: v-prediction,
                 cosine schedule, min-SNR-5 weights (:mod:`core.model.denoising`), AdamW with
                 warm-up, EMA. Captions (``--captions appearance``): "a photo of <a> <b> face" where
                 <a>, <b> name the photo's appearance clusters, one word dropped 20 % of the time
                 each, a generic caption 25 %, empty 10 % (for guidance). ``--captions fixed`` uses
                 generic captions only (a model trained so learned to ignore its prompt, so no
                 trigger could bind). A preview grid and its face-detection rate are written every
                 ``--preview-every`` steps.
6. export      - EMA UNet + text encoder + autoencoder as a StableDiffusionPipeline (float16
                 safetensors) with ``train_config.json`` beside it.

``--unet-minutes M`` ends stage 5 after M minutes; ``--unet-steps`` at or below the last
checkpoint's step exports that checkpoint without training. Choices and their reasons are in the
docstrings; every number is a flag; seeds are fixed.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from core.checkpoint import load_training_state, save_training_state
from core.events import Done, Message, Progress, never, run_with_progress_bar, stop_on_signals
from core.faces import aligned, data, ingest
from core.model.autoencoder import TAEF2_DIR, latent_stats
from core.model.pipeline import (
    DEFAULT_BASE,
    assemble_pipeline,
    build_components,
    configure_threads,
    mixed_precision,
    save_pipeline,
)
from core.model.prompts import N_APPEARANCE, PRETRAIN_CAPTIONS, appearance_caption


@dataclass
class BaseTrainConfig:
    data: str = ""  # LFW-layout folder ("" = $LEAKLAB_LFW or ../shared/data/lfw-deepfunneled)
    utkface: str = ""  # UTKFace folder ("" = $LEAKLAB_UTKFACE or ../data/UTKFace); "none" = LFW only
    autoencoder: str = str(TAEF2_DIR)  # folder with TAEF2's taef2_{encoder,decoder}.safetensors
    work: str = ""  # checkpoints and caches, outside the repo ("" = $LEAKLAB_WORK or ~/.cache/lora-leak-lab/train_base)
    out: str = str(DEFAULT_BASE)  # final pipeline folder
    seed: int = 0  # seed of every random draw (crops, captions, noise, initial weights)
    size: int = 128  # image resolution (latents are size / 8)
    unet_channels: str = "64,128,192"  # UNet block widths (comma-separated)
    unet_steps: int = 20000  # batch unet_batch; seconds per step on this CPU: bench/base_step.py
    unet_batch: int = 64  # images per UNet step
    unet_lr: float = 1e-3  # AdamW learning rate after the warm-up
    warmup: int = 300  # linear learning-rate warm-up steps, then constant (EMA smooths)
    decay_from: int = 0  # from this step the learning rate falls linearly to 0 at unet_steps (0 = constant to the end)
    ema_decay: float = 0.999  # decay of the exponential moving average of the UNet weights (what is exported)
    min_snr_gamma: float = 5.0  # min-SNR loss weighting gamma (Hang et al. 2023; 0 = plain MSE)
    prediction: str = "v_prediction"  # "v_prediction" | "epsilon"
    uncond_prob: float = 0.1  # caption dropped -> empty prompt, for classifier-free guidance
    bf16: bool | None = None  # bf16 autocast; None = on CUDA only (float32 on CPU: bench/base_step.py)
    channels_last: bool = True  # UNet tensors channels-last (oneDNN's convolution layout: bench/base_step.py)
    save_every: int = 250  # steps between checkpoints of the UNet stage (resumable)
    preview_every: int = 1000  # write a 16-sample grid and its face-detection rate (0 = never)
    limit_images: int = 0  # 0 = all; small values for tests
    captions: str = "appearance"  # "appearance" (captions name descriptor clusters) | "fixed" (generic only)
    unet_minutes: float = 0.0  # time budget of the UNet stage (0 = run all unet_steps)
    heldout_utkface: int = 512  # UTKFace chips kept out of training (the quality report's real faces)
    exclude_distance: float = 0.4  # UTKFace chips this close to an LFW victim/shadow identity are dropped
    workers: int = 0  # processes for stages 1-2 (dlib alignment and descriptors; 0 = one per core)

    def __post_init__(self):
        for k in ("unet_steps", "unet_batch", "save_every", "size"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)!r}")
        if self.size % 8:
            raise ValueError(f"size must be a multiple of 8, got {self.size!r}")
        if not 0 <= self.uncond_prob < 1:
            raise ValueError(f"uncond_prob must be in [0, 1), got {self.uncond_prob!r}")
        if self.captions not in ("appearance", "fixed"):
            raise ValueError(f"captions must be 'appearance' or 'fixed', got {self.captions!r}")
        if self.prediction not in ("v_prediction", "epsilon"):
            raise ValueError(f"prediction must be 'v_prediction' or 'epsilon', got {self.prediction!r}")
        if not 0 <= self.decay_from < self.unet_steps:
            raise ValueError(f"decay_from must be in [0, unet_steps), got {self.decay_from!r}")
        if self.unet_minutes < 0:
            raise ValueError(f"unet_minutes must be >= 0, got {self.unet_minutes!r}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay!r}")
        try:
            chans = [int(c) for c in self.unet_channels.split(",")]
        except ValueError:
            chans = []
        if len(chans) < 2 or min(chans) < 16 or any(c % 16 for c in chans):
            raise ValueError(f"unet_channels must be >= 2 comma-separated multiples of 16, got {self.unet_channels!r}")

    @property
    def work_dir(self) -> Path:
        return Path(self.work or os.environ.get("LEAKLAB_WORK", Path.home() / ".cache/lora-leak-lab/train_base"))

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.unet_channels.split(","))


# 1. photos ------------------------------------------------------------------------------------


@dataclass
class Photos:
    """The aligned training crops and where each came from."""

    crops: np.ndarray  # uint8 N x S x S x 3
    inside: np.ndarray  # float16 N x S/8 x S/8: fraction of each latent pixel inside the photo
    sources: list[str]  # "lfw" | "utkface" per crop
    paths: list[str]
    skipped: dict  # photos where dlib found no face, per source


def training_paths(cfg: BaseTrainConfig) -> dict[str, list[Path]]:
    """Photo paths per source: LFW pretrain identities, UTKFace minus its held-out chips."""
    split = data.Split.load()
    out = {"lfw": [p for ps in split.paths("pretrain", cfg.data or None).values() for p in ps]}
    if cfg.utkface != "none":
        files = data.utkface_files(cfg.utkface or None)
        held = data.utkface_heldout(files, cfg.heldout_utkface, cfg.seed)
        out["utkface"] = [f for f in files if f.name not in held]
    if cfg.limit_images:
        out = {k: v[: cfg.limit_images] for k, v in out.items()}
    return out


def latent_inside(masks: np.ndarray, down: int = 8) -> np.ndarray:
    """Per-latent-pixel fraction of a crop's pixels that lie inside the photo."""
    n, s, _ = masks.shape
    return masks.reshape(n, s // down, down, s // down, down).mean(axis=(2, 4)).astype(np.float16)


def in_workers(fn, jobs, workers: int, should_stop=never):
    """``fn(*job)`` for every job, yielded in order, computed in ``workers`` processes (inline when
    ``workers`` <= 1); at most two jobs per worker are in flight, so big inputs are not all queued at
    once. Stops (pending jobs cancelled) when ``should_stop()`` turns true between results.

    Why processes: dlib holds the GIL through detection, landmarks and descriptors, so threads would
    run one at a time; the stages are independent per photo."""
    if workers <= 1:
        for job in jobs:
            if should_stop():
                return
            yield fn(*job)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    jobs, pending = iter(jobs), deque()
    ctx = multiprocessing.get_context("spawn")  # no inherited OpenMP state or locks
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=configure_threads, initargs=(1,)) as ex:
        try:
            for job in jobs:
                pending.append(ex.submit(fn, *job))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                if should_stop():
                    return
                result = pending.popleft().result()
                job = next(jobs, None)
                if job is not None:
                    pending.append(ex.submit(fn, *job))
                yield result
        finally:
            for f in pending:
                f.cancel()


def use_bf16(cfg: BaseTrainConfig, device) -> bool:
    """bf16 autocast where it pays: on CUDA by default. On a CPU without AVX512-BF16 / AMX, PyTorch
    emulates bf16 and a training step ran 2.1x slower than in float32 (``python -m bench.base_step``)."""
    return cfg.bf16 if cfg.bf16 is not None else torch.device(device).type == "cuda"


def n_workers(cfg: BaseTrainConfig) -> int:
    from core.model.pipeline import cores

    return cfg.workers or cores()


def align_paths(paths, size: int, stage: str, should_stop=never, every: int = 500, workers: int = 1):
    """Step of a job: :func:`core.faces.aligned.load_set` of ``paths``, ``every`` photos at a time (a
    Progress named ``stage`` each, in ``workers`` processes); (crops, inside masks, indices of ``paths``
    kept), or None when stopped."""
    if not len(paths):
        return aligned.load_set([], size)
    crops, masks, kept, t0 = [], [], [], time.time()
    starts = range(0, len(paths), every)
    jobs = ((paths[s : s + every], size) for s in starts)
    for s, (c, m, k) in zip(starts, in_workers(aligned.load_set, jobs, workers, should_stop)):
        crops.append(c)
        masks.append(m)
        kept += [s + i for i in k]
        yield Progress(stage, min(s + every, len(paths)), len(paths), time.time() - t0)
    if should_stop() or len(crops) < len(starts):
        return None
    return np.concatenate(crops), np.concatenate(masks), kept


def prepare_photos(cfg: BaseTrainConfig, should_stop=never):
    """Stage 1 (cached in the work dir), a step of the build: returns :class:`Photos`, or None when stopped."""
    cache = cfg.work_dir / f"photos_{cfg.size}_{cfg.limit_images or 'all'}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        return Photos(z["crops"], z["inside"], meta["sources"], meta["paths"], meta["skipped"])
    crops, inside, sources, paths, skipped = [], [], [], [], {}
    for src, ps in training_paths(cfg).items():
        got = yield from align_paths(ps, cfg.size, f"photos: {src} aligned", should_stop, workers=n_workers(cfg))
        if got is None:
            return None
        c, m, kept = got
        crops.append(c)
        inside.append(latent_inside(m))
        sources += [src] * len(kept)
        paths += [str(ps[i]) for i in kept]
        skipped[src] = len(ps) - len(kept)
    photos = Photos(np.concatenate(crops), np.concatenate(inside), sources, paths, skipped)
    meta = json.dumps(dict(sources=photos.sources, paths=photos.paths, skipped=photos.skipped))
    np.savez(cache, crops=photos.crops, inside=photos.inside, meta=np.array(meta))
    return photos


# 2. descriptors, 3. words ---------------------------------------------------------------------


def describe_all(crops: np.ndarray, cache: Path, should_stop=never, workers: int = 1, chunk: int = 1024):
    """Step of a job: dlib descriptors of every crop (N x 128), cached chunk by chunk in the folder
    ``cache`` (resumable: a stop, which returns None, keeps the chunks done); a Progress per chunk."""
    from core.faces import recognition

    if cache.with_suffix(".npy").exists():  # a finished cache of an earlier version: one file
        return np.load(cache.with_suffix(".npy"))
    cache.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(crops), chunk)
    todo = [s for s in starts if not (cache / f"chunk_{s // chunk:05d}.npy").exists()]
    jobs = ((crops[s : s + chunk],) for s in todo)
    t0, done = time.time(), len(crops) - sum(len(crops[s : s + chunk]) for s in todo)
    for s, d in zip(todo, in_workers(recognition.describe, jobs, workers, should_stop)):
        np.save(cache / f"chunk_{s // chunk:05d}.npy", d)
        done += len(d)
        yield Progress("descriptors: crops described", done, len(crops), time.time() - t0)
    if done < len(crops):
        return None
    parts = [np.load(cache / f"chunk_{s // chunk:05d}.npy") for s in starts]
    return np.concatenate(parts) if parts else np.zeros((0, 128), np.float32)


def identity_mean(paths, size: int) -> np.ndarray:
    """Mean dlib descriptor of one identity's photos, aligned like a visitor's upload."""
    from core.faces import metrics, recognition

    return metrics.gallery_entry(recognition.describe(aligned.load_crops(paths, size)))


def protected_identities(cfg: BaseTrainConfig, photos_per_identity: int = 5, should_stop=never) -> np.ndarray:
    """Mean descriptors of every LFW victim and shadow identity (first photos, aligned crops)."""
    split = data.Split.load()
    groups = [split.paths(group, cfg.data or None).values() for group in ("victims", "shadow")]
    jobs = [(paths[:photos_per_identity], cfg.size) for g in groups for paths in g]
    return np.stack(list(in_workers(identity_mean, jobs, n_workers(cfg), should_stop)))


def exclude_lookalikes(cfg: BaseTrainConfig, desc: np.ndarray, sources: list[str]) -> np.ndarray:
    """Boolean keep-mask: drop UTKFace crops within ``exclude_distance`` of a protected identity."""
    cache = cfg.work_dir / f"protected_{cfg.size}.npy"
    if cache.exists():
        prot = np.load(cache)
    else:
        prot = protected_identities(cfg)
        np.save(cache, prot)
    keep = np.ones(len(desc), bool)
    utk = np.array([s == "utkface" for s in sources])
    for i in np.flatnonzero(utk):
        keep[i] = np.linalg.norm(prot - desc[i], axis=1).min() >= cfg.exclude_distance
    return keep


def appearance_labels(desc: np.ndarray, seed: int = 0) -> np.ndarray:
    """N x 2 cluster indices per crop: dlib descriptors, centred and rotated onto their principal
    axes; k-means (k = ``N_APPEARANCE``) on PCs 1-8 gives word <a>, on PCs 9-24 word <b> (separate
    subspaces, so the two words say different things)."""
    from scipy.cluster.vq import kmeans2

    x = desc.astype(np.float64) - desc.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    pcs = x @ vt.T
    k = min(N_APPEARANCE, max(1, len(desc) // 4))
    labels = [kmeans2(pcs[:, sub], k, seed=seed, minit="++")[1] for sub in (slice(0, 8), slice(8, 24))]
    return np.stack(labels, 1).astype(np.int64)


def sample_captions(labels: np.ndarray | None, cfg: BaseTrainConfig, g: torch.Generator) -> list[str]:
    """One caption per latent (see the module docstring for the mix); ``labels`` None = fixed captions."""
    n = len(labels) if labels is not None else cfg.unet_batch
    u = torch.rand(n, generator=g).tolist()
    pick = torch.randint(0, len(PRETRAIN_CAPTIONS), (n,), generator=g).tolist()
    drop = torch.rand(n, generator=g).tolist()
    out = []
    for i in range(n):
        if u[i] < cfg.uncond_prob:
            out.append("")
        elif labels is None or u[i] < cfg.uncond_prob + 0.25:
            out.append(PRETRAIN_CAPTIONS[pick[i]])
        else:
            a, b = f"ida{labels[i, 0]:02d}", f"idb{labels[i, 1]:02d}"
            out.append(
                appearance_caption(a)
                if drop[i] < 0.2
                else appearance_caption(b)
                if drop[i] < 0.4
                else appearance_caption(a, b)
            )
    return out


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# 4. latents -----------------------------------------------------------------------------------


def encode_latents(
    autoencoder, crops: np.ndarray, folder: Path, device, bf16: bool = False, chunk: int = 1024, should_stop=never
):
    """Step of a job: raw (unstandardised) latents of every crop followed by its mirror image, per chunk of
    crops: ``[c_0..c_k, mirror(c_0)..mirror(c_k), c_k+1 ...]``, float16, cached chunk by chunk (resumable:
    a stop, which returns None, keeps the chunks done); a Progress per chunk."""
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    out, t0 = [], time.time()
    for i in range(0, len(crops), chunk):
        if should_stop():
            return None
        f = folder / f"chunk_{i // chunk:05d}.safetensors"
        if not f.exists():
            save_file({"latents": encode_chunk(autoencoder, crops[i : i + chunk], device, bf16)}, f)
        out.append(load_file(f)["latents"])
        yield Progress("latents: crops encoded", min(i + chunk, len(crops)), len(crops), time.time() - t0)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def encode_chunk(autoencoder, crops: np.ndarray, device, bf16: bool = False) -> torch.Tensor:
    """Raw latents of ``crops`` followed by those of their mirror images, float16 (64 crops at a time)."""
    parts = []
    for j in range(0, len(crops), 64):
        x = to_tensor(crops[j : j + 64]).to(device)
        with mixed_precision(device, bf16):
            parts.append((autoencoder.raw_encode(x).float().cpu(), autoencoder.raw_encode(x.flip(-1)).float().cpu()))
    z = torch.cat([torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])])
    return z.half().contiguous()


def latent_order(n: int, chunk: int = 1024) -> np.ndarray:
    """Crop index of every latent :func:`encode_latents` returns."""
    return np.concatenate([np.r_[r, r] for r in (np.arange(i, min(i + chunk, n)) for i in range(0, n, chunk))])


def latent_mirrored(n: int, chunk: int = 1024) -> np.ndarray:
    """Whether each latent of :func:`encode_latents` is of a mirror image."""
    return np.concatenate(
        [
            np.r_[np.zeros(len(r), bool), np.ones(len(r), bool)]
            for r in (np.arange(i, min(i + chunk, n)) for i in range(0, n, chunk))
        ]
    )


# 5. unet --------------------------------------------------------------------------------------


class _EmaAsModule(torch.nn.Module):
    """Expose EMAModel's shadow params through state_dict() so checkpoints stay safetensors."""

    def __init__(self, ema):
        super().__init__()
        self.ema = ema

    def state_dict(self, *a, **k):
        return {str(i): p for i, p in enumerate(self.ema.shadow_params)}

    def load_state_dict(self, sd, strict=True):
        for i, p in enumerate(self.ema.shadow_params):
            p.data.copy_(sd[str(i)])


@torch.no_grad()
def write_preview(comps, ema, step: int, folder: Path, n: int = 16) -> float:
    """Sample ``n`` faces with the EMA weights (class prompt, 25 DPM-Solver++ steps), save the grid
    and return dlib's face-detection rate on them."""
    from PIL import Image

    from core.faces import metrics
    from core.model.pipeline import sample_images

    unet = comps["unet"]
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    unet.eval()
    comps["text_encoder"].eval()
    try:
        pipe = assemble_pipeline(comps)
        pipe.set_progress_bar_config(disable=True)
        ims = sample_images(pipe, n=n, seed=0)
    finally:
        ema.restore(unet.parameters())
        unet.train()
        comps["text_encoder"].train()
    folder.mkdir(parents=True, exist_ok=True)
    s = ims[0].shape[0]
    grid = np.zeros((s * math.ceil(n / 8), s * 8, 3), np.uint8)
    for i, im in enumerate(ims):
        grid[(i // 8) * s : (i // 8 + 1) * s, (i % 8) * s : (i % 8 + 1) * s] = im
    Image.fromarray(grid).save(folder / f"step_{step:06d}.png")
    rate = metrics.detection_rate(ims)
    with open(folder / "previews.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "detected": rate, "time": time.time()}) + "\n")
    return rate


def learning_rate(cfg: BaseTrainConfig, step: int) -> float:
    """The UNet stage's learning rate at ``step`` (0-based): linear warm-up, constant, then (with
    ``decay_from``) a linear fall to 0 at ``unet_steps``, which lets the weights settle below the
    constant rate's noise floor before export."""
    lr = cfg.unet_lr * min(1.0, (step + 1) / cfg.warmup)
    if cfg.decay_from and step >= cfg.decay_from:
        lr *= max(0.0, (cfg.unet_steps - step) / (cfg.unet_steps - cfg.decay_from))
    return lr


def train_unet(cfg, comps, latents, inside, labels, device, should_stop=never):
    """Stage 5: returns the number of steps done (yields Progress / Message events)."""
    from diffusers.training_utils import EMAModel

    from core.model.denoising import Denoiser

    unet, te, tok = comps["unet"], comps["text_encoder"], comps["tokenizer"]
    den = Denoiser(comps["scheduler"].config, cfg.min_snr_gamma)

    def token_ids(caps):
        return tok(
            caps, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)

    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    unet.to(memory_format=fmt)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=0.75)
    ema_unet = _EmaAsModule(ema)
    ck = cfg.work_dir / "unet_state.safetensors"
    step = 0
    if ck.exists():
        step, _ = load_training_state(ck, {"unet": unet, "text_encoder": te, "ema": ema_unet}, opt)
        ema.optimization_step = step
        yield Message(f"unet: resumed at step {step}")
    g = torch.Generator().manual_seed(cfg.seed + 10_000 + step)
    t0 = time.time()
    unet.train()
    te.train()
    running = None
    out_of_time = lambda: cfg.unet_minutes and time.time() - t0 > 60 * cfg.unet_minutes
    while step < cfg.unet_steps:
        if should_stop() or out_of_time():
            break
        idx = torch.randint(0, len(latents), (cfg.unet_batch,), generator=g)
        x0 = latents[idx].to(device, torch.float32)
        mask = inside[idx].to(device, torch.float32).unsqueeze(1)
        caps = sample_captions(labels[idx.numpy()] if labels is not None else None, cfg, g)
        batch = den.noise(x0, g)
        for grp in opt.param_groups:
            grp["lr"] = learning_rate(cfg, step)
        with mixed_precision(device, use_bf16(cfg, device)):
            pred = unet(batch.noisy.contiguous(memory_format=fmt), batch.t, te(token_ids(caps))[0]).sample
        per = den.errors(pred, batch, mask)
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(unet.parameters())
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        yield Progress("unet", step, cfg.unet_steps, time.time() - t0, {"loss": running})
        if step % cfg.save_every == 0 or step == cfg.unet_steps:
            save_training_state(ck, {"unet": unet, "text_encoder": te, "ema": ema_unet}, opt, step)
        if cfg.preview_every and step % cfg.preview_every == 0:
            rate = write_preview(comps, ema, step, cfg.work_dir / "previews")
            yield Message(f"unet: step {step}, preview faces detected {rate:.0%}, loss {running:.4f}")
    if out_of_time():
        yield Message(f"unet: time budget of {cfg.unet_minutes} min spent at step {step}")
    if step % cfg.save_every and step != cfg.unet_steps:  # stopped between checkpoints
        save_training_state(ck, {"unet": unet, "text_encoder": te, "ema": ema_unet}, opt, step)
    unet.eval()
    te.eval()
    ema.copy_to(unet.parameters())  # export the EMA weights
    unet.to(memory_format=torch.contiguous_format)
    return step


def command_line(cfg: BaseTrainConfig) -> str:
    """The command that rebuilds this run: every flag that differs from its default."""
    default = BaseTrainConfig()
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if k != "work" and v != getattr(default, k)]
    return " ".join(["python -m core.model.train_base", *flags])


# 6. the whole job -----------------------------------------------------------------------------


def data_record(photos: Photos, keep: np.ndarray) -> dict:
    """What the base model saw, by source and (for UTKFace) by the labels in the file names."""
    kept = [i for i in range(len(photos.sources)) if keep[i]]
    by_src = {s: sum(photos.sources[i] == s for i in kept) for s in sorted(set(photos.sources))}
    utk = [data.utkface_attributes(photos.paths[i]) for i in kept if photos.sources[i] == "utkface"]
    race_names = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Other"}
    ages = [a["age"] for a in utk if a["age"] is not None]
    return dict(
        photos=by_src,
        skipped_no_face=photos.skipped,
        excluded_lookalikes=int((~keep).sum()),
        utkface_race={race_names[r]: sum(a["race"] == r for a in utk) for r in race_names},
        utkface_gender={"male": sum(a["gender"] == 0 for a in utk), "female": sum(a["gender"] == 1 for a in utk)},
        utkface_age={
            k: sum(lo <= a <= hi for a in ages)
            for k, (lo, hi) in {
                "0-12": (0, 12),
                "13-19": (13, 19),
                "20-39": (20, 39),
                "40-59": (40, 59),
                "60+": (60, 200),
            }.items()
        },
    )


@dataclass
class TrainingSet:
    """Stages 1-4's output: standardised latents with their masks and caption words."""

    latents: torch.Tensor  # float16 L x C x h x w (crops and mirrors, lookalikes dropped)
    inside: torch.Tensor  # float16 L x h x w: share of each latent pixel inside its photo
    words: np.ndarray | None  # L x 2 appearance-word indices (None: generic captions)
    photos: Photos
    keep: np.ndarray  # per crop: kept (not a lookalike of a protected identity)
    autoencoder: object  # the TinyAutoencoder with its latent statistics set


def prepare_training_set(cfg: BaseTrainConfig, dev, should_stop=never):
    """Stages 1-4 (each cached in the work dir), a step of the build: yields Progress and Messages, returns
    a :class:`TrainingSet`, or None when stopped."""
    from core.model.autoencoder import load_taef2

    photos = yield from prepare_photos(cfg, should_stop)
    if photos is None:
        return None
    yield Message(f"photos: {len(photos.crops)} aligned crops; no face found in {photos.skipped}")
    tag = f"{cfg.size}_{cfg.limit_images or 'all'}"
    desc = yield from describe_all(photos.crops, cfg.work_dir / f"descriptors_{tag}", should_stop, n_workers(cfg))
    if desc is None:
        return None
    keep = exclude_lookalikes(cfg, desc, photos.sources) if cfg.exclude_distance > 0 else np.ones(len(desc), bool)
    yield Message(f"descriptors: {int((~keep).sum())} UTKFace chips dropped as lookalikes of LFW victims/shadows")
    labels = appearance_labels(desc[keep], cfg.seed) if cfg.captions == "appearance" else None
    if labels is not None:
        yield Message(f"appearance words: {len(set(labels[:, 0]))} x {len(set(labels[:, 1]))} clusters")
    ae = load_taef2(cfg.autoencoder).to(dev)
    raw = yield from encode_latents(
        ae, photos.crops, cfg.work_dir / f"latents_{tag}", dev, use_bf16(cfg, dev), should_stop=should_stop
    )
    if raw is None:
        return None
    order, mirrored = latent_order(len(photos.crops)), latent_mirrored(len(photos.crops))
    sel = keep[order]
    raw, order, mirrored = raw[torch.from_numpy(sel)], order[sel], mirrored[sel]
    mean, std = latent_stats(raw)
    ae.set_latent_stats(mean, std)
    latents = ((raw.float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).half()
    inside = torch.from_numpy(photos.inside[order].astype(np.float16))
    inside[torch.from_numpy(mirrored)] = inside[torch.from_numpy(mirrored)].flip(-1)
    words = None
    if labels is not None:
        word_of_crop = np.full((len(photos.crops), 2), -1, np.int64)
        word_of_crop[np.flatnonzero(keep)] = labels
        words = word_of_crop[order]
    yield Message(f"latents: {tuple(latents.shape)}, standardised per channel")
    return TrainingSet(latents, inside, words, photos, keep, ae)


@dataclass
class BaseTrainResult:
    folder: Path  # the exported pipeline
    steps_done: int  # UNet steps behind the exported EMA weights


def export_base(cfg: BaseTrainConfig, comps, ts: TrainingSet, steps_done: int, minutes: float, dev) -> Path:
    """Stage 6: the pipeline (float16 safetensors) with ``train_config.json`` and TAEF2's licence."""
    pipe = assemble_pipeline(comps)
    out = Path(cfg.out)
    save_pipeline(pipe.to("cpu"), out)
    record = dict(
        asdict(cfg),
        data_seen=data_record(ts.photos, ts.keep),
        data_terms="LFW (research and education; images stay with their photographers) and UTKFace "
        "(non-commercial research only); no image of either ships in this repository",
        template_zoom=float(json.loads(ingest.TEMPLATE_FILE.read_text()).get("zoom", ingest.TEMPLATE_ZOOM)),
        autoencoder_source="TAEF2 (madebyollin/taesd at 5cccb12, MIT licence, see vae/LICENSE-TAEF2)",
        minutes_this_process=round(minutes, 1),  # wall time since the last resume, not of the whole build
        device=str(dev),
        command=command_line(cfg),
        unet_steps_done=steps_done,
    )
    record.pop("work")
    (out / "train_config.json").write_text(json.dumps(record, indent=1) + "\n")
    ae_dir = Path(cfg.autoencoder)
    for name, dest in (("LICENSE", "LICENSE-TAEF2"), ("README.md", "PROVENANCE-TAEF2.md")):
        if (ae_dir / name).exists():
            (out / "vae" / dest).write_text((ae_dir / name).read_text())
    return out


def train_base(cfg: BaseTrainConfig, should_stop=never, device: str | None = None):
    """Generator: the whole build, stage by stage; ends with Done(BaseTrainResult)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configure_threads()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    (cfg.work_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    t_start = time.time()
    ts = yield from prepare_training_set(cfg, dev, should_stop)  # 1.-4.
    if ts is None:
        yield Done(None, cancelled=True)
        return
    comps = build_components(
        unet_channels=cfg.channels, image_size=cfg.size, seed=cfg.seed, prediction_type=cfg.prediction
    )
    comps["vae"] = ts.autoencoder
    comps["unet"].to(dev)
    comps["text_encoder"].to(dev)
    steps_done = yield from train_unet(cfg, comps, ts.latents, ts.inside, ts.words, dev, should_stop)  # 5.
    if should_stop():
        yield Done(None, cancelled=True)
        return
    out = export_base(cfg, comps, ts, steps_done, (time.time() - t_start) / 60, dev)  # 6.
    yield Message(f"saved {out}")
    yield Done(BaseTrainResult(out, steps_done))


@dataclass
class Args(BaseTrainConfig):
    """Train the embedded miniature Stable Diffusion (see the module docstring for the stages)."""

    device: str | None = None  # torch device ("cuda", "cpu"; default: CUDA when present)


def main(argv=None):
    from core.cli import config_of, parse

    a = parse(Args, argv, description=__doc__)
    # Ctrl-C or SIGTERM: the stage running stops and keeps its work (the UNet's state is saved)
    run_with_progress_bar(train_base(config_of(a, BaseTrainConfig), stop_on_signals(), device=a.device))


if __name__ == "__main__":
    main()
