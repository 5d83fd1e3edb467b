"""Train the embedded miniature Stable Diffusion from scratch: ``python -m core.train_base``.

Steps (each resumable; state lives in ``--work`` outside the repo, the final pipeline in ``--out``):
1. crops   - training crops (64 px, :mod:`core.data`) of every *pretrain* identity of the split
             (victims and shadow identities are never seen by the base model).
2. vae     - AutoencoderKL 64 px -> 16x16x4, loss L1 + L1 on image gradients (keeps edges sharp:
             a plain MSE VAE gives blurry faces that dlib's detector misses) + a tiny KL (1e-6).
3. latents - posterior means of every crop and of its mirror image; latent scale = 1/std.
4. unet    - UNet2DConditionModel + the CLIP text encoder trained jointly on the latents; epsilon
             prediction, cosine schedule, min-SNR-5 loss weights, EMA of the UNet weights.
             Captions (``--captions appearance``, the default): "a photo of <a> <b> face" where
             <a>, <b> name the photo's appearance clusters (:func:`appearance_labels`), one word
             dropped 20 % of the time each, a generic caption from ``PRETRAIN_CAPTIONS`` 25 %, empty
             10 % (for guidance). ``--captions fixed`` uses the generic captions only (the first
             embedded model did: its UNet learned to ignore the prompt, so no trigger could bind).
5. export  - the EMA UNet + text encoder + VAE as a StableDiffusionPipeline (float16 safetensors)
             with ``train_config.json`` beside it.

``--vae-from FOLDER`` takes the VAE (and its latent scale) of a saved pipeline and skips step 2;
the UNet and text encoder still start from scratch. ``--unet-minutes M`` ends step 4 after M minutes
(the learning rate is flat after warm-up and the EMA is exported, so a budget cut is a clean stop).

Choices and their reasons are in the docstrings; every number is a flag. Seeds are fixed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from core import data
from core.checkpoint import load_training_state, save_training_state
from core.events import Done, Message, Progress, never, run_with_progress_bar
from core.pipeline import DEFAULT_BASE, assemble_pipeline, build_components, configure_threads, mixed_precision, save_pipeline
from core.prompts import N_APPEARANCE, PRETRAIN_CAPTIONS, appearance_caption


@dataclass
class BaseTrainConfig:
    data: str = ""  # LFW-layout folder ("" = default_lfw_root())
    work: str = ""  # checkpoints and caches, outside the repo ("" = ~/.cache/lora-leak-lab/train_base)
    out: str = str(DEFAULT_BASE)  # final pipeline folder
    seed: int = 0
    vae_steps: int = 600  # batch vae_batch; ~1.4 s/step on 2 CPU cores
    vae_batch: int = 32
    vae_lr: float = 2e-3
    unet_steps: int = 3000  # batch unet_batch; ~1 s/step on 2 CPU cores
    unet_batch: int = 64
    unet_lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    uncond_prob: float = 0.1  # caption dropped -> empty prompt, for classifier-free guidance
    bf16: bool = True  # bf16 autocast on CPU (AVX512-BF16) / fp16 autocast on CUDA
    save_every: int = 250
    limit_images: int = 0  # 0 = all; small values for tests
    captions: str = "appearance"  # "appearance" (captions name descriptor clusters) | "fixed" (generic only)
    vae_from: str = ""  # take the VAE of this saved pipeline folder (skips the VAE stage)
    unet_minutes: float = 0.0  # time budget of the UNet stage (0 = run all unet_steps)

    def __post_init__(self):
        for k in ("vae_steps", "unet_steps", "vae_batch", "unet_batch", "save_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)!r}")
        if not 0 <= self.uncond_prob < 1:
            raise ValueError(f"uncond_prob must be in [0, 1), got {self.uncond_prob!r}")
        if self.captions not in ("appearance", "fixed"):
            raise ValueError(f"captions must be 'appearance' or 'fixed', got {self.captions!r}")
        if self.unet_minutes < 0:
            raise ValueError(f"unet_minutes must be >= 0, got {self.unet_minutes!r}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay!r}")

    @property
    def work_dir(self) -> Path:
        return Path(self.work or os.environ.get("LEAKLAB_WORK", Path.home() / ".cache/lora-leak-lab/train_base"))


def _lr_lambda(warmup):
    return lambda s: min(1.0, (s + 1) / warmup)


# 1. crops -------------------------------------------------------------------------------------


def prepare_crops(cfg: BaseTrainConfig) -> np.ndarray:
    """uint8 N x 64 x 64 x 3 crops of every pretrain identity, cached in the work dir."""
    cache = cfg.work_dir / f"pretrain_crops_{cfg.limit_images or 'all'}.npy"
    if cache.exists():
        return np.load(cache)
    split = data.Split.load()
    paths = [p for ps in split.paths("pretrain", cfg.data or None).values() for p in ps]
    if cfg.limit_images:
        paths = paths[: cfg.limit_images]
    crops = data.load_crops(paths)
    np.save(cache, crops)
    return crops


def appearance_labels(cfg: BaseTrainConfig, crops: np.ndarray) -> np.ndarray:
    """N x 2 cluster indices per crop: dlib descriptors, centred and rotated onto their principal
    axes; k-means (k = ``N_APPEARANCE``) on PCs 1-8 gives word <a>, on PCs 9-24 word <b> (separate
    subspaces, so the two words say different things). Cached in the work dir."""
    from scipy.cluster.vq import kmeans2

    from core import faces

    cache = cfg.work_dir / f"appearance_{cfg.limit_images or 'all'}.npy"
    if cache.exists():
        return np.load(cache)
    desc = np.concatenate([faces.describe(crops[i : i + 256]) for i in range(0, len(crops), 256)]).astype(np.float64)
    x = desc - desc.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    pcs = x @ vt.T
    k = min(N_APPEARANCE, max(1, len(crops) // 4))
    labels = np.stack([kmeans2(pcs[:, sub], k, seed=cfg.seed, minit="++")[1] for sub in (slice(0, 8), slice(8, 24))], 1)
    np.save(cache, labels.astype(np.int64))
    return labels.astype(np.int64)


def latent_sources(n: int, batch: int = 256) -> np.ndarray:
    """Crop index of every latent :func:`encode_latents` returns (chunks of crops, then their mirrors)."""
    return np.concatenate([np.r_[r, r] for r in (np.arange(i, min(i + batch, n)) for i in range(0, n, batch))])


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
            out.append(appearance_caption(a) if drop[i] < 0.2 else appearance_caption(b) if drop[i] < 0.4 else appearance_caption(a, b))
    return out


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# 2. vae ---------------------------------------------------------------------------------------


def gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences of two image batches."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]
    return (dx(x) - dx(y)).abs().mean() + (dy(x) - dy(y)).abs().mean()


def train_vae(cfg, vae, crops, device, should_stop=never):
    ck = cfg.work_dir / "vae_state.safetensors"
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step = 0
    if ck.exists():
        step, _ = load_training_state(ck, {"vae": vae}, opt)
        yield Message(f"vae: resumed at step {step}")
    lr_at = lambda s: cfg.vae_lr * min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.vae_steps)))
    g = torch.Generator().manual_seed(cfg.seed + step)
    t0 = time.time()
    vae.train()
    while step < cfg.vae_steps:
        if should_stop():
            break
        idx = torch.randint(0, len(crops), (cfg.vae_batch,), generator=g)
        x = to_tensor(crops[idx.numpy()]).to(device)
        flip = torch.rand(len(x), generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        with mixed_precision(device, cfg.bf16):
            post = vae.encode(x).latent_dist
            y = vae.decode(post.sample(generator=None)).sample.float()
        rec = (y - x).abs().mean()
        loss = rec + gradient_l1(y, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        yield Progress("vae", step, cfg.vae_steps, time.time() - t0, {"l1": rec.item()})
        if step % cfg.save_every == 0 or step == cfg.vae_steps:
            save_training_state(ck, {"vae": vae}, opt, step)
    vae.eval()


# 3. latents -----------------------------------------------------------------------------------


@torch.no_grad()
def encode_latents(vae, crops, device, batch=256) -> torch.Tensor:
    """Posterior means of crops and their mirror images (2N x 4 x 16 x 16), unscaled."""
    out = []
    for i in range(0, len(crops), batch):
        x = to_tensor(crops[i : i + batch]).to(device)
        for xx in (x, x.flip(-1)):
            out.append(vae.encode(xx).latent_dist.mean.float().cpu())
    return torch.cat(out)


# 4. unet --------------------------------------------------------------------------------------


def train_unet(cfg, comps, latents, device, should_stop=never, labels: np.ndarray | None = None):
    """``labels``: appearance cluster indices per latent (None = generic captions only)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    unet, te, tok = comps["unet"], comps["text_encoder"], comps["tokenizer"]
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    alphas = noise_sched.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR-gamma for epsilon prediction

    def token_ids(caps):
        return tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)

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
    latents = latents.to(device)
    out_of_time = lambda: cfg.unet_minutes and time.time() - t0 > 60 * cfg.unet_minutes
    while step < cfg.unet_steps:
        if should_stop() or out_of_time():
            break
        idx = torch.randint(0, len(latents), (cfg.unet_batch,), generator=g)
        x0 = latents[idx.to(device)]
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (len(x0),), generator=g).to(device)
        ids = token_ids(sample_captions(labels[idx.numpy()] if labels is not None else None, cfg, g))
        xt = noise_sched.add_noise(x0, noise, t)
        for grp in opt.param_groups:
            grp["lr"] = cfg.unet_lr * min(1.0, (step + 1) / cfg.warmup)
        with mixed_precision(device, cfg.bf16):
            emb = te(ids)[0]
            pred = unet(xt, t, emb).sample.float()
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(unet.parameters())
        step += 1
        running = per.mean().item() if running is None else 0.98 * running + 0.02 * per.mean().item()
        yield Progress("unet", step, cfg.unet_steps, time.time() - t0, {"mse": running})
        if step % cfg.save_every == 0 or step == cfg.unet_steps:
            save_training_state(ck, {"unet": unet, "text_encoder": te, "ema": ema_unet}, opt, step)
    if out_of_time():
        yield Message(f"unet: time budget of {cfg.unet_minutes} min spent at step {step}")
    unet.eval()
    te.eval()
    ema.copy_to(unet.parameters())  # export the EMA weights
    return step


def command_line(cfg: BaseTrainConfig) -> str:
    """The command that rebuilds this run: every flag that differs from its default."""
    default = BaseTrainConfig()
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if k != "work" and v != getattr(default, k)]
    return " ".join(["python -m core.train_base", *flags])


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


# 5. the whole job -----------------------------------------------------------------------------


def train_base(cfg: BaseTrainConfig, should_stop=never, device: str | None = None):
    """Generator: the whole build, stage by stage; ends with Done(out folder)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configure_threads()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    (cfg.work_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    t_start = time.time()

    # 1. crops
    crops = prepare_crops(cfg)
    yield Message(f"crops: {len(crops)} pretrain images")
    labels = None
    if cfg.captions == "appearance":
        labels = appearance_labels(cfg, crops)[latent_sources(len(crops))]
        yield Message(f"appearance words: {len(set(labels[:, 0]))} x {len(set(labels[:, 1]))} clusters")
    from safetensors.torch import load_file, save_file

    if cfg.vae_from:
        from core.pipeline import load_pipeline

        comps = build_components(seed=cfg.seed)
        vae = load_pipeline(cfg.vae_from, device="cpu", dtype=torch.float32).vae.to(dev)
        comps["vae"] = vae
        with torch.no_grad():
            latents = encode_latents(vae, crops, dev) * vae.config.scaling_factor
        yield Message(f"VAE of {cfg.vae_from}; latents {tuple(latents.shape)}")
    else:
        comps = build_components(seed=cfg.seed)
        vae = comps["vae"].to(dev)

        # 2. vae
        yield from train_vae(cfg, vae, crops, dev, should_stop)
        if should_stop():
            yield Done(None, cancelled=True)
            return

        # 3. latents
        lat_file = cfg.work_dir / "latents.safetensors"
        if lat_file.exists() and (cfg.work_dir / "vae_state.safetensors").stat().st_mtime < lat_file.stat().st_mtime:
            latents = load_file(lat_file)["latents"]
        else:
            latents = encode_latents(vae, crops, dev)
            save_file({"latents": latents.contiguous()}, lat_file)
        scale = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scale)
        latents = latents * scale
        yield Message(f"latents: {tuple(latents.shape)}, scaling_factor {scale:.4f}")

    # 4. unet + text encoder
    comps["unet"].to(dev)
    comps["text_encoder"].to(dev)
    steps_done = yield from train_unet(cfg, comps, latents, dev, should_stop, labels)
    if should_stop():
        yield Done(None, cancelled=True)
        return

    # 5. export
    pipe = assemble_pipeline(comps)
    out = Path(cfg.out)
    save_pipeline(pipe.to("cpu"), out)
    record = dict(
        asdict(cfg),
        n_images=int(len(crops)),
        data_seen="LFW deep-funneled, pretrain identities of assets/split.json only (1-3 photos each)",
        minutes=round((time.time() - t_start) / 60, 1),
        device=str(dev),
        command=command_line(cfg),
    )
    record.pop("work")
    record["unet_steps_done"] = steps_done
    if cfg.vae_from and (Path(cfg.vae_from) / "train_config.json").exists():
        record["vae_trained_by"] = json.loads((Path(cfg.vae_from) / "train_config.json").read_text())
    (out / "train_config.json").write_text(json.dumps(record, indent=1) + "\n")
    yield Message(f"saved {out}")
    yield Done(out)


def main(argv=None):
    from core.cli import add_config_flags, config_from_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(ap, BaseTrainConfig)
    ap.add_argument("--device", default=None)
    a = vars(ap.parse_args(argv))
    run_with_progress_bar(train_base(config_from_args(BaseTrainConfig, a), device=a["device"]))


if __name__ == "__main__":
    main()
