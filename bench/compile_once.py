"""Is compiling the fine-tune step once per process worth it on this machine? (issue 18, item 4)

    python -m bench.compile_once [--steps 80] [--visitors 4] [--threads 0]

On the shipped base and the example face's photos, with the app's default recipe, in one run:
1. eager: one visitor's fine-tune (``--steps`` stacked steps of one LoRA, as the training hub runs
   it), then one step of ``--visitors`` LoRAs together;
2. compiling: :meth:`core.finetune.batch.AdapterStack.compile` (one LoRA, then two: the graphs
   every batch size uses), its wall time;
3. compiled: the same fine-tune and the same batched step.
It prints the speed-up per step and per fine-tune and the break-even: how many visitors' fine-tunes
pay back the compile time. The app compiles in the background at start-up (``app.py --compile``,
on by default) because the break-even comes within the first few visitors of a workshop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from core.cli import parse


@dataclass
class Args:
    steps: int = 80  # fine-tune steps per visitor (the app's default)
    visitors: int = 4  # LoRAs in the batched step
    threads: int = 0  # intra-op threads (0: every core, as the training hub's thread has)


def fine_tune_seconds(pipe, stack, cfg, photos, steps: int) -> float:
    from core.finetune.batch import LoRABatch

    batch = LoRABatch(pipe, cfg, stack)
    batch.add(0, photos, replace(cfg, steps=steps))
    t0 = time.perf_counter()
    while batch.step():
        pass
    return time.perf_counter() - t0


def batched_step_seconds(pipe, stack, cfg, photos, k: int, repeats: int = 3) -> float:
    from core.finetune.batch import LoRABatch

    batch = LoRABatch(pipe, cfg, stack)
    for i in range(k):
        batch.add(i, photos, replace(cfg, seed=i, steps=repeats + 1))
    batch.step()  # first step of a new batch size: warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        batch.step()
    return (time.perf_counter() - t0) / repeats


def main(argv=None):
    from bench.cloak_speed import example_photos
    from core.finetune.batch import AdapterStack
    from core.finetune.live import LiveConfig
    from core.model.pipeline import configure_threads, load_pipeline

    a = parse(Args, argv, description=__doc__)
    configure_threads(a.threads or None)
    pipe = load_pipeline()
    photos = example_photos(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    cfg = replace(LiveConfig().finetune, seed=0, trigger=None)
    stack = AdapterStack(pipe, cfg)
    fine_tune_seconds(pipe, stack, cfg, photos, 2)  # warm-up (oneDNN primitives, class images)
    eager = fine_tune_seconds(pipe, stack, cfg, photos, a.steps)
    eager_k = batched_step_seconds(pipe, stack, cfg, photos, a.visitors)
    if not stack.compile(photos):
        print(f"compiling failed: {stack.compile_error}")
        return
    compiled = fine_tune_seconds(pipe, stack, cfg, photos, a.steps)
    compiled_k = batched_step_seconds(pipe, stack, cfg, photos, a.visitors)
    saved = eager - compiled
    print(f"compile once per process, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {pipe.device}")
    print(f"  compiling (one LoRA, then two):          {stack.compile_seconds:7.1f} s")
    print(f"  one visitor, {a.steps} steps: eager {eager:6.1f} s, compiled {compiled:6.1f} s ({eager / compiled:.2f}x)")
    print(
        f"  {a.visitors} LoRAs, one step:     eager {eager_k:6.2f} s, compiled {compiled_k:6.2f} s "
        f"({eager_k / compiled_k:.2f}x)"
    )
    if saved > 0:
        n = stack.compile_seconds / saved
        print(f"  break-even: the compile time is paid back after {n:.1f} visitors' fine-tunes")
    else:
        print("  no gain: the compiled fine-tune is not faster here")


if __name__ == "__main__":
    main()
