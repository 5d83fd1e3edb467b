"""Seconds per training step of the base-model recipe (``core.model.train_base``: the 128 px
layout's UNet, 16x16x32 latents, and the text encoder, batch 64, AdamW), per numeric format, on
this machine, each arm against float32 measured in the same run (arms interleaved, median of
``--repeats`` pairs of steps):
- float32 (the CPU default);
- bf16 autocast (``--bf16 True``; the CUDA default): on a CPU without AVX512-BF16 or AMX PyTorch
  emulates bf16, which is why it is off on CPU by default;
- float32 with channels-last tensors (oneDNN's preferred layout for convolutions).

    python -m bench.base_step [--threads 1] [--repeats 3] [--batch 64]
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from core.cli import parse
from core.model.pipeline import build_components, mixed_precision


@dataclass
class Args:
    threads: int = 1  # intra-op threads (the training run's LEAKLAB_THREADS)
    repeats: int = 3  # timed pairs of steps per arm (median reported)
    batch: int = 64  # images per step (the recipe's unet_batch)


ARMS = {"float32": (False, False), "bf16 autocast": (True, False), "float32, channels-last": (False, True)}


def main(argv=None):
    a = parse(Args, argv, description=__doc__)
    torch.set_num_threads(a.threads)
    comps = build_components(unet_channels=(64, 128, 192), image_size=128, seed=0, prediction_type="v_prediction")
    unet, te, tok = comps["unet"], comps["text_encoder"], comps["tokenizer"]
    caps = ["a photo of a face"] * a.batch
    ids = tok(caps, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    opt = torch.optim.AdamW([*unet.parameters(), *te.parameters()], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 32, 16, 16, generator=g)
    t = torch.randint(0, 1000, (a.batch,), generator=g)
    cpu = torch.device("cpu")

    def step(bf16: bool, channels_last: bool):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        unet.to(memory_format=fmt)
        with mixed_precision(cpu, bf16):
            pred = unet(x.to(memory_format=fmt), t, te(ids.input_ids)[0]).sample
        loss = (pred.float() - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {k: [] for k in ARMS}
    for arm in ARMS.values():  # warm-up (oneDNN primitive caches)
        step(*arm)
    for _ in range(a.repeats):
        for name, arm in ARMS.items():
            t0 = time.perf_counter()
            step(*arm)
            step(*arm)
            times[name].append((time.perf_counter() - t0) / 2)
    base = statistics.median(times["float32"])
    print(f"base-model training step, batch {a.batch}, {a.threads} thread(s), {torch.__version__}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:24s} {m:6.2f} s/step  ({m / base:.2f}x float32's time)")


if __name__ == "__main__":
    main()
