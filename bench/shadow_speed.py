"""Shadow-population training speed: K LoRAs per batched forward vs one at a time.

    python -m bench.shadow_speed [--k 16] [--steps 40]

Baseline (measured in the same run): ``core.finetune.lora.finetune``, the visitor's recipe, one LoRA
after another. Batched: ``core.attack.shadow.train_many`` with K LoRAs at once (same recipe, same
per-run random streams: tests/test_shadow.py checks that each LoRA matches its one-at-a-time
twin). Both use the same photos (5 LFW shadow photos per LoRA) and warm class-image cache.
Prints LoRA-steps per second of each, the ratio (= LoRAs per CPU-hour ratio) and the projected
LoRAs per CPU-hour for the default step count.

Bounds (same run), on all K LoRAs' images in one plain batch: (1) one LoRA (peft's layers, the
recipe's targets) for all of them: the same arithmetic as K LoRAs, without any per-LoRA grouping,
so single / (1) is the most batching can give with these LoRA layers; (2) the frozen base UNet
alone, no LoRA, forward + backward to its input: the most any LoRA implementation could give.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

import torch

from core.attack.shadow import train_many
from core.events import drain
from core.faces import aligned, data
from core.finetune.lora import FinetuneConfig, finetune
from core.model.pipeline import load_pipeline
from core.model.prior import class_latents


def batch_time(pipe, n: int, steps: int, cfg: FinetuneConfig | None = None) -> float:
    """Seconds per step of forward + backward through the base UNet on ``n`` images in one plain batch:
    frozen, backward to its input (``cfg`` None), or carrying one LoRA (peft's layers, ``cfg``'s targets),
    backward to that LoRA's weights."""
    from core.finetune.batch import adapter_unet

    if cfg is None:
        unet = copy.deepcopy(pipe.unet).requires_grad_(False)
    else:
        unet = adapter_unet(pipe, cfg)
        for name, p in unet.named_parameters():
            p.requires_grad_("lora_" in name)
    dev, c = pipe.device, unet.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    x = torch.randn(n, c.in_channels, size, size, device=dev)
    emb = torch.randn(n, pipe.tokenizer.model_max_length, c.cross_attention_dim, device=dev)
    t = torch.randint(0, 1000, (n,), device=dev)
    for i in range(steps + 1):
        if i == 1:  # the first step warms up
            t0 = time.perf_counter()
        xi = x.clone().requires_grad_(cfg is None)
        unet(xi, t, emb).sample.pow(2).mean().backward()
    return (time.perf_counter() - t0) / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=16, help="LoRAs trained at once")
    ap.add_argument("--steps", type=int, default=40, help="steps per LoRA in this measurement")
    ap.add_argument("--single", type=int, default=3, help="one-at-a-time runs timed (the baseline)")
    a = ap.parse_args(argv)
    pipe = load_pipeline(None, dtype=torch.float32)  # as core.attack.shadow trains
    cfg = FinetuneConfig(steps=a.steps, checkpoint_every=0, preview_n=0)
    class_latents(pipe, cfg.n_class)  # warm cache for both
    people = data.Split.load().paths("shadow")
    names = [n for n in sorted(people) if len(people[n]) >= 5][: a.k]
    crops = [list(aligned.load_crops(people[n][:5])) for n in names]

    t0 = time.perf_counter()
    for i in range(a.single):
        drain(finetune(pipe, crops[i], replace(cfg, seed=i)))
    single = (time.perf_counter() - t0) / (a.single * a.steps)  # seconds per LoRA-step

    t0 = time.perf_counter()
    drain(train_many(pipe, crops, cfg, seeds=range(a.k)))
    many = (time.perf_counter() - t0) / (a.k * a.steps)

    n_img, n_steps = a.k * 2 * cfg.batch, min(a.steps, 10)
    frozen = batch_time(pipe, n_img, n_steps) / a.k
    one_lora = batch_time(pipe, n_img, n_steps, cfg) / a.k

    default_steps = FinetuneConfig().steps
    print(
        f"device {pipe.device}, threads {torch.get_num_threads()}, {a.steps} steps per LoRA, batch "
        f"{cfg.batch}+{cfg.batch}"
    )
    print(
        f"one at a time (finetune):   {1000 * single:7.1f} ms per LoRA-step -> {3600 / (single * default_steps):6.0f} "
        f"LoRAs/CPU-hour at {default_steps} steps"
    )
    print(
        f"{a.k} at once (train_many):  {1000 * many:7.1f} ms per LoRA-step -> {3600 / (many * default_steps):6.0f} "
        f"LoRAs/CPU-hour at {default_steps} steps"
    )
    print(f"speed-up: {single / many:.2f}x")
    print(
        f"bounds, on the same {a.k} x {2 * cfg.batch} images in one batch (per LoRA-step; the most any batching "
        f"of LoRAs could give over one at a time):"
    )
    print(f"  one LoRA (peft's layers) for all of them: {1000 * one_lora:7.1f} ms -> {single / one_lora:.2f}x")
    print(f"  the frozen UNet alone, no LoRA at all:    {1000 * frozen:7.1f} ms -> {single / frozen:.2f}x")


if __name__ == "__main__":
    main()
