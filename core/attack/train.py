"""Train the weight-only attacker on the shadow population: ``python -m core.attack.train``.

Objective (the paper's): the denoising loss of each shadow LoRA's own model (base + that LoRA)
on that shadow identity's photo latents, conditioned on z = attacker(LoRA, step); only the
attacker learns (base and LoRAs frozen). Step-token paradigm (the paper's Algorithm 2): every
recorded checkpoint of a shadow trajectory is a sample, with its step index as the step token, so
a population of LoRAs gives ~20 samples each and the attacker works at any step of a live fine-tune.

Speed: K LoRAs per optimisation step run as one ``vmap``-ed forward over their stacked adapters
(:mod:`core.attack.shadow`). A held-out tail of the population is scored every ``--eval-every`` steps:
the same fixed-noise denoising loss for z = attacker's mean, for the class prompt (the naive
attack's prompt) and for the true trigger's prompt (what the LoRA was trained with; the attacker
never sees it). The final attacker and a JSON log go to ``--out``.

Several GPUs: ``accelerate launch --multi_gpu --num_processes N -m core.attack.train ...`` trains one
attacker data-parallel (accelerate's DistributedDataParallel: each process draws its own K LoRAs per
step from its own random stream, gradients are averaged, so a step sees N x K LoRAs); the held-out
score and the file are made by the main process. Any base works by model id (``--model``): the
attacker's inputs follow the shadow LoRAs' layers and its output the base's prompt-embedding shape.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.attack.attacker import ATTACKER_DIR, Attacker, config_for, lora_inputs, save_attacker
from core.attack.shadow import list_shadows, load_shadow
from core.events import Done, Message, Progress, never
from core.finetune.batch import adapter_unet, stacked_forward, to_param_names
from core.finetune.lora import FinetuneConfig, encode_prompt
from core.model.denoising import Denoiser
from core.model.pipeline import mixed_precision
from core.model.prompts import CLASS_PROMPT, instance_prompt


@dataclass
class TrainConfig:
    steps: int = 1200  # optimisation steps of the attacker
    loras_per_step: int = 8  # K LoRAs per optimisation step
    latents_per_lora: int = 4  # photo latents (with mirrors) per LoRA per step
    lr: float = 5e-4  # AdamW peak learning rate (warm-up, then cosine decay to 0)
    warmup: int = 50  # linear warm-up steps
    kl_weight: float = 0.0  # the paper's public code: 0
    grad_clip: float = 1.0  # clip the gradient's L2 norm to this
    holdout: int = 16  # last shadow LoRAs kept out of training, scored every eval_every steps
    eval_every: int = 100  # steps between held-out evaluations
    min_step: int = 5  # trajectory checkpoints used: step >= min_step
    # "canonical" is invariant to refactoring B A; "raw": B and A as stored
    inputs: str = "canonical"  # encoder input per LoRA module: "canonical" (balanced SVD factors of B A) | "raw" (B, A)
    width: int = 128  # token width of the weight encoder's transformer
    layers: int = 3  # transformer layers of the weight encoder
    seed: int = 0  # seed of initialisation, LoRA order and noise draws
    minutes: float = 0.0  # time budget (0 = none): after 20 steps the schedule is shortened to fit it


class DenoisingLoss:
    """Denoising loss of K (LoRA, z) pairs on their latents, in one vmap-ed forward (half-precision
    autocast on CUDA, as the shadow LoRAs were trained)."""

    def __init__(self, pipe, rank: int, alpha: float, targets):
        self.unet = adapter_unet(pipe, FinetuneConfig(rank=rank, alpha=alpha, unet_targets=tuple(targets)))
        self.device = pipe.device
        self.amp = pipe.device.type == "cuda"
        self.den = Denoiser(pipe.scheduler.config)
        self.batched = stacked_forward(self.unet)

    def __call__(self, loras: list[dict], z: torch.Tensor, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Per-LoRA loss (K,). ``x0``: K x b x C x H x W latents; ``z``: K x L x D."""
        names = [to_param_names(lo) for lo in loras]
        dev = self.device
        params = {n: torch.stack([p[n] for p in names]).to(dev) for n in names[0]}
        k, b = x0.shape[:2]
        noised = self.den.noise(x0.flatten(0, 1).to(dev), g)  # draws on the CPU: same numbers on every device
        emb = z.to(dev).unsqueeze(1).expand(k, b, *z.shape[1:])
        with mixed_precision(dev, self.amp):
            pred = self.batched(params, noised.noisy.unflatten(0, (k, b)), noised.t.unflatten(0, (k, b)), emb)
        return self.den.errors(pred.flatten(0, 1), noised).unflatten(0, (k, b)).mean(1)


def lr_at(step: int, cfg: TrainConfig, total: int | None = None) -> float:
    """Linear warm-up, then cosine decay to 0 at ``total`` steps (default ``cfg.steps``)."""
    total = total or cfg.steps
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))))


class ShadowSet:
    """The shadow LoRAs in memory (trajectory checkpoints from ``cfg.min_step`` on, float16), the last
    ``cfg.holdout`` of them held out."""

    def __init__(self, files: list[Path], cfg: TrainConfig):
        shadows = [load_shadow(f) for f in files]
        for s in shadows:  # keep the population compact in memory
            s.checkpoints = {
                r: {k: v.half() for k, v in ck.items()} for r, ck in s.checkpoints.items() if r >= cfg.min_step
            }
        if len(shadows) <= cfg.holdout:
            raise ValueError(f"need more than {cfg.holdout} shadow LoRAs, found {len(shadows)}")
        self.train = shadows[: -cfg.holdout] if cfg.holdout else shadows
        self.held = shadows[-cfg.holdout :] if cfg.holdout else []
        self.first = shadows[0]
        self.cfg = cfg

    def batch(self, rng: random.Random, g: torch.Generator):
        """``loras_per_step`` random (LoRA, checkpoint) pairs: (steps, LoRAs float32, their photo latents)."""
        picks = [rng.choice(self.train) for _ in range(self.cfg.loras_per_step)]
        steps = [rng.choice(sorted(s.checkpoints)) for s in picks]
        loras = [{n: v.float() for n, v in s.checkpoints[r].items()} for s, r in zip(picks, steps)]
        x0 = torch.stack(
            [s.latents[torch.randint(0, len(s.latents), (self.cfg.latents_per_lora,), generator=g)] for s in picks]
        )
        return steps, loras, x0


@torch.no_grad()
def held_out_losses(pipe, model, loss_fn, data: ShadowSet, cls_emb) -> dict | None:
    """Fixed-noise loss on the held-out LoRAs at their last step: attacker vs class prompt vs true trigger."""
    held = data.held
    if not held:
        return None
    eg = torch.Generator().manual_seed(12345)
    last = max(held[0].checkpoints)
    loras = [{n: v.float() for n, v in s.checkpoints[last].items()} for s in held]
    x0 = torch.stack([s.latents[: data.cfg.latents_per_lora] for s in held])
    z = model.encode(loras, [last] * len(held))
    trig = torch.stack([encode_prompt(pipe, instance_prompt(s.trigger))[0].float() for s in held])
    out = {}
    for name, zz in (("attacker", z), ("class prompt", cls_emb.expand_as(z)), ("true trigger", trig)):
        vals = []
        for rep in range(4):
            eg.manual_seed(12345 + rep)
            vals.append(loss_fn(loras, zz, x0, eg))
        out[name] = float(torch.stack(vals).mean())
    return out


def attacker_step(
    model, core, opt, loss_fn, data: ShadowSet, cfg: TrainConfig, rng, g, accelerator=None
) -> tuple[float, float]:
    """One optimisation step on a random batch of shadow checkpoints: (reconstruction loss, KL).
    ``model``: what the step runs (the attacker, or accelerate's wrapper of it); ``core``: the attacker."""
    dev = next(core.parameters()).device
    model.train()
    steps, loras, x0 = data.batch(rng, g)
    inputs = [(u.to(dev), v.to(dev)) for u, v in lora_inputs(loras, core.cfg)]
    mu, logvar = model(inputs, torch.as_tensor(steps, device=dev))
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    rec = loss_fn(loras, z, x0.float(), g).mean()
    kl = 0.5 * (mu.sub(core.class_embedding).pow(2) + logvar.exp() - 1 - logvar).mean()
    opt.zero_grad(set_to_none=True)
    loss = rec + cfg.kl_weight * kl
    accelerator.backward(loss) if accelerator is not None else loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return float(rec.detach()), float(kl.detach())


@dataclass
class AttackerTrainResult:
    model: Attacker  # the trained attacker (eval mode)
    log: dict  # config, per-step losses, held-out evaluations, steps done, seconds, shadow LoRAs used


def train(pipe, files: list[Path], cfg: TrainConfig, should_stop=never, accelerator=None):
    """Generator: train an attacker on shadow LoRA files; ``Done(AttackerTrainResult, cancelled)``.
    ``accelerator``: an ``accelerate.Accelerator`` when several processes train it together (process
    i draws from seed + i; process 0 draws what a single process draws; only it evaluates)."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    me = accelerator.process_index if accelerator is not None else 0
    rng, g = random.Random(cfg.seed + me), torch.Generator().manual_seed(cfg.seed + me)
    data = ShadowSet(files, cfg)
    first = data.first
    rank, alpha = int(first.meta["rank"]), float(first.meta["alpha"])
    targets = json.loads(first.meta["config"]).get("unet_targets") or FinetuneConfig().unet_targets
    with torch.no_grad():
        cls_emb = encode_prompt(pipe, CLASS_PROMPT)[0].float()
    acfg = config_for(
        pipe, next(iter(first.checkpoints.values())), rank, alpha, inputs=cfg.inputs, width=cfg.width, layers=cfg.layers
    )
    model = core = Attacker(acfg, cls_emb).to(pipe.device)  # core: the attacker itself, model: what the steps run
    loss_fn = DenoisingLoss(pipe, rank, alpha, targets)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    if accelerator is not None:
        model, opt = accelerator.prepare(model, opt)
    main_process = accelerator is None or accelerator.is_main_process
    yield Message(
        f"{len(data.train)} training LoRAs x {len(first.checkpoints)} checkpoints, {len(data.held)} held out; "
        f"attacker {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"
    )
    log = {"config": asdict(cfg), "train": [], "eval": []}
    total, t_loop = cfg.steps, time.perf_counter()
    for step in range(cfg.steps):
        if should_stop() or step >= total:
            break
        if cfg.minutes and step == 20:
            per_step = (time.perf_counter() - t_loop) / 20
            total = _agreed(max(21, min(cfg.steps, int(60 * cfg.minutes / per_step))), accelerator)
            yield Message(f"time budget {cfg.minutes} min: {total} steps at {per_step:.3f} s/step")
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, cfg, total)
        rec, kl = attacker_step(model, core, opt, loss_fn, data, cfg, rng, g, accelerator)
        log["train"].append([step + 1, rec, kl])
        yield Progress("attacker", step + 1, total, time.perf_counter() - t0, {"loss": rec})
        if main_process and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == total):
            core.eval()
            ev = held_out_losses(pipe, core, loss_fn, data, cls_emb)
            if ev:
                log["eval"].append({"step": step + 1, **ev})
                yield Message(
                    f"step {step + 1}: held-out denoising loss " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items())
                )
    core.eval()
    log.update(
        steps_done=len(log["train"]),
        seconds=time.perf_counter() - t0,
        shadow_loras=len(data.train),
        processes=accelerator.num_processes if accelerator is not None else 1,
    )
    yield Done(AttackerTrainResult(core, log), cancelled=len(log["train"]) < total)


def _agreed(value, accelerator):
    """The main process's ``value`` in every process (a step count every process must stop at)."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


@dataclass
class Args(TrainConfig):
    """Train the weight-only attacker on the shadow LoRA population."""

    shadow: str | None = None  # shadow LoRA folder (default: core.attack.shadow.shadow_dir())
    out: str = str(ATTACKER_DIR / "attacker.safetensors")  # attacker file to write (.safetensors, with a .json log)
    limit: int = 0  # use only the first N shadow LoRAs (0 = all)
    model: str | None = None  # base model folder or hub id (default: the embedded base)


def main(argv=None):
    from core.cli import command_line, config_of, parse
    from core.events import run_with_progress_bar
    from core.model.pipeline import load_pipeline

    a = parse(Args, argv)
    cfg = config_of(a, TrainConfig)
    acc = _accelerator()
    # float32 weights on CUDA too (training); each process on its own device
    pipe = load_pipeline(a.model, str(acc.device) if acc is not None else None, dtype=torch.float32)
    files = list_shadows(a.shadow)
    if a.limit:
        files = files[: a.limit]
    res = run_with_progress_bar(train(pipe, files, cfg, accelerator=acc))
    if acc is not None and not acc.is_main_process:
        return
    model, log = res.model, res.log
    info = {
        "command": command_line("core.attack.train", argv),
        "shadow_loras": log["shadow_loras"],
        "seconds": round(log["seconds"], 1),
        "final_eval": log["eval"][-1] if log["eval"] else None,
        "device": _device_words(pipe.device),
        "data_seen": f"LoRAs of {log['shadow_loras'] + cfg.holdout} shadow identities (never victims, never "
        f"pre-training), {log['shadow_loras']} for training and {cfg.holdout} held out",
    }
    out = save_attacker(model, a.out, info)
    Path(out).with_suffix(".json").write_text(json.dumps({**info, "log": log}, indent=1) + "\n")
    print(f"attacker -> {out}")


def _device_words(device: torch.device) -> str:
    """Where the attacker trained, in words (its record's ``device``)."""
    import os

    if device.type == "cuda":
        return f"one {torch.cuda.get_device_name(device)}"
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _accelerator():
    """accelerate's Accelerator when this process is one of several (``accelerate launch`` / ``torchrun``;
    gloo without a GPU), else None: a single process trains exactly as before."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


if __name__ == "__main__":
    main()
