"""Issue 18's GPU targets, measured in one process through the training hub (no browser and no Gradio:
the lent GPU machines have neither, and nothing can be installed there but carried wheels; see
``bench/gpu.sh``, which prepares and runs this on such a machine).

    python -m bench.gpu_room [--device cuda] [--visitors 30] [--steps 80] [--spread 10]

On the shipped base and the example face's photos, the app's default recipe, in one run:

1. **One visitor's fine-tune** (``--steps`` steps as the hub trains it: one LoRA in a batch),
   eager and with the step compiled once (:meth:`core.finetune.batch.AdapterStack.compile`: on
   CUDA inductor's "reduce-overhead" mode, i.e. the step replayed as CUDA graphs), alternating,
   ``--repeats`` times each; the compile's own time. Target on one GPU: <= 3 s for 80 steps.
2. **One visitor through the hub** (live attacks on, compiled step): seconds from submitting to the
   first reconstruction and to ``Done``.
3. **A room**: ``--visitors`` visitors submit within ``--spread`` seconds (seeded press times), each
   in their own thread as the app's handlers are; per visitor the seconds from their press to the
   first reconstruction and to ``Done``, p50 / p95, the room's wall time from the first press to
   the last ``Done`` (target on one GPU: 30 visitors all done within 60 s), and that every visitor
   got a LoRA of their own (distinct weights).

It runs on a CPU too (e.g. ``--device cpu --visitors 3 --steps 6`` checks the script), where the
CPU targets are measured through the app instead (``bench/workshop.py``).
"""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from core.cli import parse


@dataclass
class GpuRoomArgs:
    device: str = ""  # torch device (default: cuda where a GPU is seen, else cpu)
    visitors: int = 30  # the room's visitors
    steps: int = 80  # fine-tuning steps per visitor (the app's default)
    spread: float = 10.0  # the visitors submit at random moments within this many seconds
    repeats: int = 3  # timed solo fine-tunes per arm (eager, compiled), alternating
    seed: int = 0  # seed of the press times


def solo(engine, photos, a: GpuRoomArgs) -> None:
    from bench.compile_once import eager_vs_compiled

    stack, times = eager_vs_compiled(engine.pipe, photos, a.steps, a.repeats)
    print(f"## 1. one visitor's fine-tune, {a.steps} steps (as the hub trains it), median of {a.repeats}")
    eager = statistics.median(times["eager"])
    print(f"eager: {eager:.2f} s ({', '.join(f'{t:.2f}' for t in times['eager'])})")
    if not times["compiled"]:
        print(f"compiled: failed ({stack.compile_error})")
        return
    fast = statistics.median(times["compiled"])
    kind = "inductor, CUDA graphs" if stack.compile_mode == "reduce-overhead" else "inductor"
    print(
        f"compiled ({kind}, compiling took {stack.compile_seconds:.0f} s): {fast:.2f} s "
        f"({', '.join(f'{t:.2f}' for t in times['compiled'])}): {eager / fast:.2f}x eager's speed"
    )


@dataclass
class Visit:
    press: float = 0.0  # seconds after the room's start
    first: float | None = None  # seconds from press to the first reconstruction
    done: float | None = None  # seconds from press to Done
    lora: str = ""  # hash of the visitor's LoRA
    error: str = ""


def visit(hub, photos, steps: int, start: float, out: Visit) -> None:
    from core.finetune.live import LiveConfig
    from core.finetune.lora import FinetuneConfig

    time.sleep(max(0.0, start + out.press - time.perf_counter()))
    t0 = time.perf_counter()
    try:
        for ev in hub.submit(photos, LiveConfig(FinetuneConfig(steps=steps))):
            name = type(ev).__name__
            if name == "Reconstruction" and out.first is None:
                out.first = time.perf_counter() - t0
            if name == "Done":
                out.done = time.perf_counter() - t0
                lora = ev.result.result.lora
                h = hashlib.sha256()
                for k in sorted(lora):
                    h.update(lora[k].numpy().tobytes())
                out.lora = h.hexdigest()
    except Exception as e:  # one visitor's failure is reported, the others go on
        out.error = f"{type(e).__name__}: {e}"[:200]


def room(hub, photos, n: int, a: GpuRoomArgs) -> list[Visit]:
    presses = np.sort(np.random.default_rng(a.seed).uniform(0, a.spread, n)) if n > 1 else [0.0]
    visits = [Visit(press=float(p)) for p in presses]
    start = time.perf_counter()
    threads = [threading.Thread(target=visit, args=(hub, photos, a.steps, start, v)) for v in visits]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return visits


def report(title: str, visits: list[Visit]) -> None:
    print(title)
    for i, v in enumerate(visits):
        first = f"{v.first:.1f}" if v.first is not None else "-"
        done = f"{v.done:.1f}" if v.done is not None else "-"
        said = f"first reconstruction {first} s, done {done} s {v.error}"
        print(f"  visitor {i + 1:2d}: pressed at {v.press:4.1f} s, {said}")
    done = [v.done for v in visits if v.done is not None]
    firsts = [v.first for v in visits if v.first is not None]
    if done:
        last = max(v.press + v.done for v in visits if v.done is not None) - min(v.press for v in visits)
        print(
            f"  done: {len(done)} of {len(visits)}; p50 {np.percentile(done, 50):.1f} s, p95 "
            f"{np.percentile(done, 95):.1f} s; first press to last done {last:.1f} s"
        )
    if firsts:
        print(f"  first reconstruction: p50 {np.percentile(firsts, 50):.1f} s, p95 {np.percentile(firsts, 95):.1f} s")
    loras = [v.lora for v in visits if v.lora]
    print(f"  LoRAs: {len(set(loras))} distinct of {len(loras)}")


def main(argv=None) -> None:
    from bench.cloak_speed import example_photos
    from core.engine import Engine
    from core.finetune.hub import HubConfig, TrainingHub

    a = parse(GpuRoomArgs, argv, description=__doc__)
    engine = Engine(None, a.device or None)
    photos = example_photos(engine.image_size)
    name = torch.cuda.get_device_name() if engine.pipe.device.type == "cuda" else "CPU"
    print(f"# python -m bench.gpu_room, {engine.pipe.device} ({name}), torch {torch.__version__}")
    solo(engine, photos, a)
    attacker, _ = engine.attacker()
    hub = TrainingHub(engine.pipe, attacker, engine.floor_images(), HubConfig(compile=True))
    while hub.compile_state() == "compiling":
        time.sleep(0.5)
    print(f"hub: {hub.max_batch} visitors per batch; compiled step: {hub.compile_state()}")
    report("## 2. one visitor through the hub (live attacks on)", room(hub, photos, 1, a))
    report(f"## 3. {a.visitors} visitors within {a.spread:.0f} s", room(hub, photos, a.visitors, a))


if __name__ == "__main__":
    main()
