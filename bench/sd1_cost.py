"""What training the attacker for Stable Diffusion 1.5 costs: counted FLOPs, and (on a GPU) measured time.

    python -m bench.sd1_cost                 # FLOPs of SD 1.5's UNet, counted (no weights, no download, seconds)
    python -m bench.sd1_cost --memory        # + peak memory of one training sample, measured on this CPU (fp32)
    python -m bench.sd1_cost --gpu --k 4     # + shadow LoRA-steps and attacker steps timed on a GPU

The FLOPs are counted by ``torch.utils.flop_counter`` on SD 1.5's UNet built from its config on the
"meta" device (shapes only): one sample's forward, and one training sample of the shadow recipe
(forward, then backward into the frozen UNet's activations and the LoRA's weights; the attacker's
step costs the same, its gradient reaching z through every cross-attention layer). The time estimate
divides them by an *effective* throughput (``--tflops``): a UNet at SD's sizes runs far below a GPU's
peak (MosaicML trained SD 2 at 512 px on A100s at ~14.6 samples/s each, ~11 % of the A100's bf16 peak
by this count); 100 TFLOP/s is ~10 % of an H100's / H200's dense bf16 peak. ``--gpu`` replaces the
assumption with a measurement: a random-weight pipeline with SD 1.5's widths (tests/sd1x.py) runs
:func:`core.attack.shadow.train_many` on K LoRAs and :class:`core.attack.train.DenoisingLoss` +
backward, both timed after a warm-up step.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from core.finetune.lora import FinetuneConfig, lora_config
from tests.sd1x import SD1_DOWN, SD1_UP, SD15_SIZES

SHADOW_STEPS = 100  # core.attack.shadow's default trajectory length
SHADOW_LORAS = 128  # the shipped attacker's population size
ATTACKER_STEPS, LORAS_PER_STEP, LATENTS_PER_LORA = 254, 16, 4  # the shipped attacker's recipe (README)
N_CLASS, CLASS_STEPS = 32, 25  # class images drawn once per base


def sd15_unet(device="meta"):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=SD15_SIZES["unet_channels"],
            layers_per_block=2,
            down_block_types=SD1_DOWN,
            up_block_types=SD1_UP,
            cross_attention_dim=768,
            attention_head_dim=8,
        )


def count_flops(cfg: FinetuneConfig) -> tuple[float, float, int]:
    """(forward FLOPs per sample, training FLOPs per sample, LoRA layers) of SD 1.5's UNet with the recipe's LoRA."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = sd15_unet().requires_grad_(False)
    unet.add_adapter(lora_config(cfg))
    x, t, e = (
        torch.randn(1, 4, 64, 64, device="meta"),
        torch.tensor([500], device="meta"),
        torch.randn(1, 77, 768, device="meta"),
    )
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        unet(x, t, e)
    with FlopCounterMode(display=False) as train:
        unet(x, t, e).sample.float().pow(2).mean().backward()
    layers = sum(1 for n, _ in unet.named_parameters() if "lora_A" in n)
    return fwd.get_total_flops(), train.get_total_flops(), layers


def peak_memory_cpu(cfg: FinetuneConfig) -> float:
    """GB of extra peak resident memory of one training sample (fp32, SDPA) on this CPU, weights excluded."""
    unet = sd15_unet("cpu").requires_grad_(False)
    unet.add_adapter(lora_config(cfg))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    x, t, e = torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.randn(1, 77, 768)
    unet(x, t, e).sample.pow(2).mean().backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - before


def time_gpu(k: int, steps: int, sizes: dict = SD15_SIZES, device: str = "cuda") -> tuple[float, float]:
    """(seconds per shadow LoRA-step with k LoRAs at once, seconds per attacker step with k LoRAs x 4 latents)
    on a random-weight pipeline with SD 1.5's widths (``sizes``: other widths, for a dry run on the CPU)."""
    import numpy as np

    from core.attack.shadow import train_many
    from core.attack.train import DenoisingLoss
    from core.events import drain
    from core.model.pipeline import assemble_pipeline
    from tests.sd1x import sd1_components

    pipe = assemble_pipeline(sd1_components(**sizes)).to(device)
    side = sizes.get("image_size", 64)
    crops = [list(np.random.default_rng(i).integers(0, 256, (5, side, side, 3), dtype=np.uint8)) for i in range(k)]
    cfg = FinetuneConfig(steps=1, checkpoint_every=0, preview_n=0, n_class=2 * k)
    drain(train_many(pipe, crops, cfg))  # warm-up (class images, kernels)
    sync(device)
    t0 = time.perf_counter()
    drain(train_many(pipe, crops, FinetuneConfig(steps=steps, checkpoint_every=0, preview_n=0, n_class=2 * k)))
    sync(device)
    shadow = (time.perf_counter() - t0) / (k * steps)
    loss = DenoisingLoss(pipe, cfg.rank, cfg.alpha, cfg.unet_targets)
    from core.finetune.batch import initial_adapters, unstack

    stack = initial_adapters(pipe, cfg, range(k))
    loras = [unstack(stack, i) for i in range(k)]
    z = torch.randn(k, 77, pipe.text_encoder.config.hidden_size, device=device, requires_grad=True)
    x0 = torch.randn(k, LATENTS_PER_LORA, 4, side // 8, side // 8)
    g = torch.Generator().manual_seed(0)
    for i in range(steps + 1):
        if i == 1:
            sync(device)
            t0 = time.perf_counter()
        loss(loras, z, x0, g).mean().backward()
    sync(device)
    return shadow, (time.perf_counter() - t0) / steps


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--tflops", type=float, default=100.0, help="assumed effective TFLOP/s of the GPU (see the docstring)"
    )
    ap.add_argument(
        "--memory", action="store_true", help="measure one training sample's peak memory on this CPU (~10 GB)"
    )
    ap.add_argument("--gpu", action="store_true", help="time the shadow and attacker steps on a CUDA GPU")
    ap.add_argument("--k", type=int, default=4, help="LoRAs at once for --gpu")
    ap.add_argument("--steps", type=int, default=5, help="timed steps for --gpu")
    a = ap.parse_args(argv)
    cfg = FinetuneConfig()
    fwd, train, layers = count_flops(cfg)
    samples = 2 * cfg.batch  # instance + class images per LoRA-step
    shadow = SHADOW_STEPS * samples * train
    klass = N_CLASS * CLASS_STEPS * fwd
    attacker = ATTACKER_STEPS * LORAS_PER_STEP * LATENTS_PER_LORA * train
    rate = a.tflops * 1e12
    print(f"SD 1.5 UNet at 512 px (64x64 latents), the recipe's rank-{cfg.rank} LoRA on {layers} layers:")
    print(f"  forward {fwd / 1e12:.3f} TFLOP per sample; training (fwd + bwd) {train / 1e12:.3f} TFLOP per sample")
    print(
        f"  one shadow LoRA ({SHADOW_STEPS} steps x {samples} samples): {shadow / 1e15:.3f} PFLOP; "
        f"{SHADOW_LORAS} LoRAs {SHADOW_LORAS * shadow / 1e15:.1f} PFLOP; class images {klass / 1e15:.2f} PFLOP"
    )
    print(
        f"  attacker ({ATTACKER_STEPS} steps x {LORAS_PER_STEP} LoRAs x {LATENTS_PER_LORA} latents): "
        f"{attacker / 1e15:.1f} PFLOP"
    )
    total = SHADOW_LORAS * shadow + klass + attacker
    print(
        f"at an effective {a.tflops:g} TFLOP/s: shadow population {SHADOW_LORAS * shadow / rate / 60:.1f} min "
        f"({shadow / rate:.1f} s per LoRA), attacker {attacker / rate / 60:.1f} min, in all {total / rate / 60:.0f} min"
    )
    if a.memory:
        print(f"one training sample, fp32 on this CPU: +{peak_memory_cpu(cfg):.1f} GB peak beyond the weights")
    if a.gpu:
        s, t = time_gpu(a.k, a.steps)
        print(
            f"measured on {torch.cuda.get_device_name()}: shadow {s:.3f} s per LoRA-step ({a.k} at once) -> "
            f"{SHADOW_LORAS * SHADOW_STEPS * s / 60:.1f} min for {SHADOW_LORAS} LoRAs; attacker {t:.3f} s per step of "
            f"{a.k} LoRAs x {LATENTS_PER_LORA} latents -> {ATTACKER_STEPS * t * LORAS_PER_STEP / a.k / 60:.1f} min; "
            f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GB"
        )


if __name__ == "__main__":
    main()
