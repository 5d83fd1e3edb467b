"""Is compiling the fine-tune step once per process worth it on this machine? (issue 18, item 4)

    python -m bench.compile_once [--steps 80] [--repeats 2] [--threads 1]

On the shipped base and the example face's photos, with the app's default recipe, in one run:
1. compiling: :meth:`core.finetune.batch.AdapterStack.compile` (one LoRA's stacked step, forward
   and backward), its wall time, with inductor's on-disk cache cold or warm (a second start on the
   same machine reuses the generated code);
2. one visitor's fine-tune (``--steps`` stacked steps of one LoRA, as the training hub runs it),
   eager and compiled, alternating, ``--repeats`` times each (this VM's speed drifts by up to ~25 %).
Several LoRAs at once run eagerly either way (see :class:`~core.finetune.batch.AdapterStack`). It
prints the speed-up and how many solo fine-tunes' savings equal the compile time. The app compiles
in the background at start-up (``app.py --compile``, on by default): what a visitor gains is the
shorter wait, once it is ready.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, replace

import torch

from core.cli import parse


@dataclass
class Args:
    steps: int = 80  # fine-tune steps per visitor (the app's default)
    repeats: int = 2  # timed fine-tunes per arm, the arms alternating (median reported)
    threads: int = 1  # intra-op threads (the app's training thread has one core of two; the other draws)


def fine_tune_seconds(pipe, cfg, photos, steps: int, forward) -> float:
    """One visitor's fine-tune as the training hub runs it (one LoRA in a batch), with ``forward``."""
    from core.finetune.batch import LoRABatch

    batch = LoRABatch(pipe, cfg, forward=forward)
    batch.add(0, photos, replace(cfg, steps=steps))
    t0 = time.perf_counter()
    while batch.step():
        pass
    return time.perf_counter() - t0


def eager_vs_compiled(pipe, photos, steps: int, repeats: int):
    """The default recipe's :class:`~core.finetune.batch.AdapterStack`, warmed up and compiled, then
    ``repeats`` solo fine-tunes of ``steps`` steps with each of its forwards, alternating. Returns
    ``(stack, {"eager": [s, ...], "compiled": [s, ...]})``; the compiled arm is empty when compiling
    failed (``stack.compile_error`` says why)."""
    from core.finetune.batch import AdapterStack
    from core.finetune.live import LiveConfig

    cfg = replace(LiveConfig().finetune, seed=0, trigger=None)
    stack = AdapterStack(pipe, cfg)
    fine_tune_seconds(pipe, cfg, photos, 2, stack.eager)  # warm-up (oneDNN primitives or kernels, class images)
    compiled = stack.compile(photos)
    times = {"eager": [], "compiled": []}
    for _ in range(repeats):
        times["eager"].append(fine_tune_seconds(pipe, cfg, photos, steps, stack.eager))
        if compiled:
            times["compiled"].append(fine_tune_seconds(pipe, cfg, photos, steps, stack.forward))
    return stack, times


def main(argv=None):
    from bench.cloak_speed import example_photos
    from core.model.pipeline import load_pipeline

    a = parse(Args, argv, description=__doc__)
    pipe = load_pipeline(threads=a.threads)
    photos = example_photos(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    cache = "warm: compiled on this machine before" if inductor_cache_warm() else "cold"
    stack, times = eager_vs_compiled(pipe, photos, a.steps, a.repeats)
    if not times["compiled"]:
        print(f"compiling failed: {stack.compile_error}")
        return
    eager, compiled = (statistics.median(times[k]) for k in ("eager", "compiled"))
    print(f"compile once per process, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {pipe.device}")
    print(f"  compiling (one LoRA, forward + backward): {stack.compile_seconds:6.1f} s (inductor's cache {cache})")
    print(
        f"  one visitor, {a.steps} steps: eager {eager:5.1f} s, compiled {compiled:5.1f} s: {eager / compiled:.2f}x "
        f"(runs: eager {', '.join(f'{t:.1f}' for t in times['eager'])}; "
        f"compiled {', '.join(f'{t:.1f}' for t in times['compiled'])})"
    )
    saved = eager - compiled
    if saved > 0:
        print(f"  the compile's time equals what {stack.compile_seconds / saved:.0f} solo fine-tunes save")
    else:
        print("  no gain: the compiled fine-tune is not faster here")


def inductor_cache_warm() -> bool:
    """Has inductor compiled on this machine before (its on-disk cache holds generated code)?"""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.path.isdir(cache_dir()) and any(os.scandir(cache_dir()))


if __name__ == "__main__":
    main()
