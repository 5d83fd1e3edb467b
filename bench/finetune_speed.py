"""Fine-tune speed: the project's default recipe vs. a plain loop written the way diffusers'
``train_dreambooth_lora.py`` does it, on the same pipeline, photos, steps and batch.

    python -m bench.finetune_speed [--victim 0] [--steps N] [--compare old]

The plain loop, per step: turns the pixel batch into latents with the VAE (``latent_dist.sample()``),
runs the text encoder on the tokenised prompts, concatenates instance and class halves, runs the
UNet in float32, splits the loss into instance and prior parts. Both runs start from the same LoRA
initialisation and data (5 LFW victim photos, cached class images) and take the same number of
steps. Prints both wall times, their ratio and both final losses (mean of the last 10 steps), and
the part of the plain loop that caching can remove at all (its inputs alone, timed with the UNet
step left out): the plain loop's time over what remains bounds any caching speed-up.
``--compare``: also times the default recipe on another model in the same run (``old``: the 64 px
base the embedded one replaced, from git history), on the same person's photos at its resolution.
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from core.events import drain
from core.faces import aligned, data
from core.finetune.lora import FinetuneConfig, finetune, lora_config
from core.model.pipeline import image_size_of, load_pipeline, mixed_precision
from core.model.prior import class_latents, decode_latents
from core.model.prompts import CLASS_PROMPT, instance_prompt, random_trigger


def plain_loop(pipe, crops, class_images, cfg: FinetuneConfig, trigger: str, inputs_only: bool = False) -> list[float]:
    """diffusers-example-style DreamBooth LoRA loop (no caching; float32 on CPU, with the half-precision
    autocast that the example's ``--mixed_precision`` gives through accelerate on CUDA). ``inputs_only``:
    run only what caching can remove (batch assembly, VAE, tokenizer, text encoder, noising), no UNet."""
    dev = pipe.device
    unet = copy.deepcopy(pipe.unet).requires_grad_(False)
    torch.manual_seed(cfg.seed)
    unet.add_adapter(lora_config(cfg))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    to_px = lambda ims: torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    inst_px, cls_px = to_px(crops), to_px(class_images)
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # as the example loads it
    tok = pipe.tokenizer
    rng = random.Random(cfg.seed)
    losses = []
    for _ in range(cfg.steps):
        ii = [rng.randrange(len(inst_px)) for _ in range(cfg.batch)]
        ci = [rng.randrange(len(cls_px)) for _ in range(cfg.batch)]
        inst = inst_px[ii]
        flip = torch.rand(len(inst)) < 0.5  # the example's RandomHorizontalFlip
        inst[flip] = inst[flip].flip(-1)
        pixel_values = torch.cat([inst, cls_px[ci]]).to(dev)
        with torch.no_grad():
            latents = pipe.vae.encode(pixel_values).latent_dist.sample() * pipe.vae.config.scaling_factor
            ids = tok(
                [instance_prompt(trigger)] * cfg.batch + [CLASS_PROMPT] * cfg.batch,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(dev)
            enc = pipe.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=dev)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        if inputs_only:
            continue
        with mixed_precision(dev, dev.type == "cuda"):
            pred = unet(noisy, t, enc).sample
        p_inst, p_cls = pred.chunk(2)
        target = noise  # what the model predicts: the example's branch on the scheduler's prediction type
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, t)
        n_inst, n_cls = target.chunk(2)
        loss = F.mse_loss(p_inst.float(), n_inst.float()) + cfg.prior_weight * F.mse_loss(p_cls.float(), n_cls.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def compare_model(name: str) -> str | None:
    """A model folder for ``--compare``: ``old`` is the 64 px base the embedded one replaced."""
    if name != "old":
        return name
    from core.rebuild import old_base

    return old_base()  # None outside a git checkout that holds it


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--victim", type=int, default=0, help="index of the identity whose first 5 photos are used")
    ap.add_argument("--group", default="victims", choices=("victims", "shadow"), help="identity group of the split")
    ap.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compare", default=None, help="another model to time the recipe on ('old': the 64 px base)")
    a = ap.parse_args(argv)
    pipe = load_pipeline(dtype=torch.float32)  # float32 weights on every device; the recipe autocasts on CUDA
    people = data.Split.load().paths(a.group)
    name = sorted(n for n in people if len(people[n]) >= 5)[a.victim]
    crops = list(aligned.load_crops(people[name][:5], size=image_size_of(pipe)))
    cfg = FinetuneConfig(checkpoint_every=0, preview_n=0)
    if a.steps:
        cfg.steps = a.steps
    class_latents(pipe, cfg.n_class)  # warm the prior cache (the target is for a warm cache)
    trigger = random_trigger(random.Random(0))
    cls_images = decode_latents(pipe, class_latents(pipe, cfg.n_class))

    ours, plain = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        res = drain(finetune(pipe, crops, FinetuneConfig(**{**cfg.__dict__, "trigger": trigger})))
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pl = plain_loop(pipe, crops, cls_images, cfg, trigger)
        plain.append(time.perf_counter() - t0)
    inputs = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        plain_loop(pipe, crops, cls_images, cfg, trigger, inputs_only=True)
        inputs.append(time.perf_counter() - t0)
    o, p, i = min(ours), min(plain), min(inputs)
    print(
        f"device {pipe.device}, torch threads {torch.get_num_threads()}, {cfg.steps} steps, batch "
        f"{cfg.batch}+{cfg.batch}, 5 photos, warm prior cache"
    )
    print(f"default recipe (core.finetune.lora): {o:6.2f} s   final loss {np.mean(res.losses[-10:]):.4f}")
    print(f"plain diffusers-style loop:     {p:6.2f} s   final loss {np.mean(pl[-10:]):.4f}")
    print(f"speed-up: {p / o:.2f}x (best of {a.repeats} each)")
    print(
        f"of the plain loop's {p:.2f} s, {i:.2f} s is what caching removes (batches, VAE, tokenizer, text encoder, "
        f"noising); the rest is the UNet step both loops run: caching alone can give at most {p / (p - i):.2f}x"
    )
    other = compare_model(a.compare) if a.compare else None
    if a.compare and other is None:
        print("no old base here (not a git checkout holding its commit): comparison left out")
    if other:
        del pipe  # one model in memory at a time
        pipe2 = load_pipeline(other, dtype=torch.float32)
        crops2 = list(aligned.load_crops(people[name][:5], size=image_size_of(pipe2)))
        class_latents(pipe2, cfg.n_class)
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            drain(finetune(pipe2, crops2, FinetuneConfig(**{**cfg.__dict__, "trigger": trigger})))
            times.append(time.perf_counter() - t0)
        c = min(times)
        print(
            f"default recipe on {a.compare} ({image_size_of(pipe2)} px, same person, steps and batch): {c:6.2f} s; "
            f"the embedded model takes {o / c:.2f}x its time"
        )


if __name__ == "__main__":
    main()
