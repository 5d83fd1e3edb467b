"""Where a visitor's live fine-tune spends its time, and what each of the hub's choices saves.

    python -m bench.live_work [--reps 2] [--steps 80] [--model M]

Six measurements, each against its baseline in the same run:

1. **Sampling one LoRA.** One sampler forward (2 images) through the vmapped adapter UNet (the
   GPU path of :mod:`core.finetune.live_batch`) against the UNet with the LoRA merged into a copy
   (the CPU path), and the base UNet alone (the floor: no LoRA at all).
2. **Threads.** One fine-tune step (the batch trainer, one LoRA) in a worker thread, alone, and
   again after the main thread has computed on every core (PyTorch's OpenMP runtime keeps the main
   thread's team of threads for the process's lifetime, and the worker's team then waits asleep
   between parallel regions). What :func:`core.model.pipeline.thread_with_cores` and the app's
   one-core default avoid.
3. **One visitor through the training hub** (default recipe, live attack on, the example face),
   with the live work in a second thread (``HubConfig.live_thread``, the default), the same with the
   last checkpoint's reconstruction and previews drawn one after the other in that thread
   (``HubConfig.split_last`` off: by default, once nothing else trains, the previews are drawn in a
   thread of their own on the trainer's idle core), and between steps, alternating, each arm in a
   fresh process: seconds to the first reconstruction, to ``Done``, and from the last step to
   ``Done`` (the last checkpoint's live work and the score: what the visitor waits for after training);
   and the default with dlib's descriptors computed in the hub's own process (``face_worker`` off).
4. **dlib beside training.** A fine-tune step on one core, alone and while a second thread describes
   a face every 0.5 s, with dlib in this process (it holds the GIL through each call) and in
   :mod:`core.faces.recognition`'s worker process.
5. **The trainer's cores.** A stacked fine-tune step of 1 and of 8 visitors in one worker thread on
   one core and on every core, alternating: what the training hub would gain by giving its trainer
   the live thread's core while the live thread has nothing to draw (8 visitors: 1.59x on 2 cores).
   Tried through the app, it lost: sixteen visitors' p95 time to done was 0.56 of the one-at-a-time
   arm's with it against 0.51 without, and the app's RSS grew 14 % over the room
   (``docs/results/bench_workshop_16_128.txt``), presumably because the live thread's work, which
   starts at any step, then shares its core with the trainer's second OpenMP thread. The hub keeps
   one core for each.
6. **The optimizer step.** One AdamW step of the default LoRA (its 212 tensors) on one core, torch's
   per-tensor loop (its CPU default) against the fused kernel (:func:`core.finetune.lora.adamw`),
   alternating, on the same gradients; and the largest difference of the weights after 20 steps.
   A room's trainer takes one such step per visitor and step.

    python -m bench.live_work --sections 3 4 --arms thread dlib-here   # only the face worker's effect
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.cli import parse

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LiveWorkArgs:
    reps: int = 2  # visits per hub arm (each arm alternates with the other)
    steps: int = 80  # fine-tuning steps of the visit (the app's default: 80)
    model: str = ""  # model folder or hub id (default: the embedded model)
    arms: tuple[str, ...] = ("thread", "thread-one", "between", "dlib-here")  # the hub arms of measurement 3
    sections: tuple[int, ...] = (1, 2, 3, 4, 5, 6)  # the measurements to run
    arm: str = ""  # internal: run one hub arm (one of ``arms``) in this process, print JSON


def example_photos(size: int) -> list:
    from core.faces.ingest import ingest_face

    folder = sorted(p for p in (ROOT / "assets" / "examples").iterdir() if p.is_dir())[0]
    return [ingest_face(str(p), size=size).crop for p in sorted(folder.glob("*.png"))[:4]]


def stacked_batch(pipe, photos, k: int = 1):
    """The default recipe's batch trainer with ``k`` visitors on ``photos``, warmed up by one step."""
    from core.finetune.batch import LoRABatch
    from core.finetune.lora import FinetuneConfig

    cfg = FinetuneConfig(checkpoint_every=0, preview_n=0)
    batch = LoRABatch(pipe, cfg)
    for key in range(k):
        batch.add(key, photos, cfg)
    batch.step()
    return batch


def timed_steps(batch, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        batch.step()
    return (time.perf_counter() - t) / n


def step_seconds(pipe, photos, n: int = 15) -> float:
    return timed_steps(stacked_batch(pipe, photos), n)


def in_thread(fn, cores: int):
    from core.model.pipeline import thread_with_cores

    out = {}
    thread_with_cores(lambda: out.setdefault("v", fn()), cores, "bench").join()
    return out["v"]


def threads(pipe, photos) -> None:
    """Runs last in-process: it leaves the main thread with a team of threads."""
    from core.model.pipeline import cores

    alone = in_thread(lambda: step_seconds(pipe, photos), cores())
    torch.set_num_threads(cores())  # the main thread computes on every core once (as a script would)
    step_seconds(pipe, photos, n=2)
    beside = in_thread(lambda: step_seconds(pipe, photos), cores())
    print(f"## 2. threads ({cores()} cores)")
    print(f"fine-tune step in a worker thread, alone: {alone * 1000:.0f} ms")
    print(f"after the main thread computed on every core: {beside * 1000:.0f} ms ({beside / alone:.2f}x)")


def dlib_beside(pipe, photos) -> None:
    """A fine-tune step on one core, alone and while a second thread describes one face every 0.5 s
    (as the live work scores a checkpoint), with dlib in this process and in the face worker."""
    from core.faces import recognition

    def step_beside(worker: bool | None) -> float:
        stop = threading.Event()

        def score():
            while not stop.is_set():
                recognition.describe(photos[:1])
                time.sleep(0.4)

        if worker is not None:
            recognition.describe_in_worker(worker)
            recognition.describe(photos[:1])  # the worker started and its models loaded
            th = threading.Thread(target=score)
            th.start()
        try:
            return in_thread(lambda: step_seconds(pipe, photos), 1)
        finally:
            stop.set()
            if worker is not None:
                th.join()

    first = step_beside(None)
    rows = [("dlib here", step_beside(False)), ("dlib in the worker", step_beside(True))]
    recognition.describe_in_worker(False)
    rows.insert(0, ("alone (first and last, mean)", (first + step_beside(None)) / 2))  # the VM's speed drifts
    print("## 4. a fine-tune step (one core) while another thread describes a face every 0.5 s")
    for name, sec in rows:
        print(f"{name}: {sec * 1000:.0f} ms ({sec / rows[0][1]:.2f}x alone)")


def trainer_cores(pipe, photos, reps: int = 2, n: int = 3) -> None:
    """A stacked step of 1 and of 8 visitors in one worker thread, on one core and on every core,
    alternating (the VM's speed drifts)."""
    from core.model.pipeline import cores

    def run():
        rows = []
        for k in (1, 8):
            batch = stacked_batch(pipe, photos, k)
            per = {1: [], cores(): []}
            for _ in range(reps):
                for c in per:
                    torch.set_num_threads(c)
                    batch.step()  # the new team of threads started
                    per[c].append(timed_steps(batch, n))
            rows.append((k, per))
        return rows

    print(f"## 5. a stacked fine-tune step in one thread, one core against {cores()} (alternating)")
    for k, per in in_thread(run, 1):
        one, every = (sum(v) / len(v) for v in per.values())
        print(
            f"{k} visitor{'s' if k > 1 else ''}: {one * 1000:.0f} ms on one core, {every * 1000:.0f} ms on "
            f"{cores()} ({one / every:.2f}x)"
        )


def optimizer_step(pipe, reps: int = 3, n: int = 100) -> None:
    """AdamW on the default LoRA's tensors: torch's per-tensor loop against the fused kernel, one core."""
    from core.finetune.batch import initial_adapters
    from core.finetune.lora import FinetuneConfig, adamw

    cfg = FinetuneConfig()
    init = initial_adapters(pipe, cfg, [0])
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(v.shape[1:], generator=g) for v in init.values()]

    def optimizer(fused: bool):
        params = [v[0].clone().requires_grad_(True) for v in init.values()]
        for p, gr in zip(params, grads):
            p.grad = gr
        if fused:
            return params, adamw(params, cfg.lr)
        return params, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, foreach=False)

    def run():
        arms = {False: optimizer(False), True: optimizer(True)}
        for _, opt in arms.values():
            for _ in range(20):
                opt.step()
        diff = max(float((a - b).detach().abs().max()) for a, b in zip(arms[False][0], arms[True][0]))
        per = {False: [], True: []}
        for _ in range(reps):
            for fused, (_, opt) in arms.items():
                t = time.perf_counter()
                for _ in range(n):
                    opt.step()
                per[fused].append((time.perf_counter() - t) / n)
        return diff, {k: sum(v) / len(v) for k, v in per.items()}

    diff, per = in_thread(run, 1)
    print(f"## 6. one AdamW step of the default LoRA ({len(init)} tensors), one core, alternating")
    print(
        f"per-tensor loop (torch's CPU default): {per[False] * 1000:.2f} ms; fused: {per[True] * 1000:.2f} ms "
        f"({per[False] / per[True]:.1f}x); weights after 20 steps differ by at most {diff:.1e}"
    )


def sampling(pipe) -> None:
    from core.finetune.batch import adapter_unet, initial_adapters, peft_key, stacked_forward
    from core.finetune.lora import FinetuneConfig, pipeline_with_lora
    from core.model.pipeline import cores

    cfg = FinetuneConfig()
    unet = adapter_unet(pipe, cfg)
    forward = stacked_forward(unet)
    params = initial_adapters(pipe, cfg, [0])
    lora = {peft_key(n): v[0] for n, v in params.items()}
    merged = pipeline_with_lora(pipe, lora, cfg.alpha).unet
    side, ch = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    x, t = torch.randn(2, ch, side, side), torch.full((2,), 500)
    e = torch.randn(2, pipe.text_encoder.config.max_position_embeddings, pipe.text_encoder.config.hidden_size)

    def ms(fn, reps: int = 10) -> float:
        with torch.no_grad():
            fn()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
        return (time.perf_counter() - t0) / reps * 1000

    def measure():
        return (
            ms(lambda: forward(params, x[None], t[None], e[None])),
            ms(lambda: merged(x, t, e).sample),
            ms(lambda: pipe.unet(x, t, e).sample),
        )

    stacked, merged_ms, base = in_thread(measure, cores())
    print("## 1. sampling one LoRA (one forward, 2 images)")
    print(f"vmapped adapter UNet (GPU path): {stacked:.0f} ms; merged copy (CPU path): {merged_ms:.0f} ms ", end="")
    print(f"({stacked / merged_ms:.2f}x faster); base UNet alone: {base:.0f} ms")


def hub_arm(a: LiveWorkArgs) -> None:
    """One visitor through a fresh training hub, ``a.reps`` times; prints JSON lines."""
    from core.engine import Engine
    from core.finetune.hub import HubConfig, TrainingHub
    from core.finetune.live import LiveConfig
    from core.finetune.lora import FinetuneConfig

    engine = Engine(a.model or None)
    photos = example_photos(engine.image_size)

    def visits():
        attacker, _ = engine.attacker()
        cfg = HubConfig(
            live_thread=a.arm != "between", split_last=a.arm != "thread-one", face_worker=a.arm != "dlib-here"
        )
        hub = TrainingHub(engine.pipe, attacker, engine.floor_images(), cfg)
        for _ in range(a.reps):
            t0, first, trained = time.perf_counter(), None, None
            for ev in hub.submit(photos, LiveConfig(FinetuneConfig(steps=a.steps))):
                if first is None and type(ev).__name__ == "Reconstruction":
                    first = time.perf_counter() - t0
                if type(ev).__name__ == "Progress" and ev.step == a.steps:
                    trained = time.perf_counter() - t0
            done = time.perf_counter() - t0
            print(json.dumps({"arm": a.arm, "first": first, "done": done, "tail": done - trained}), flush=True)

    th = threading.Thread(target=visits)  # as in the app: a handler thread, not the main one
    th.start()
    th.join()


def hub(a: LiveWorkArgs) -> None:
    rows = {arm: [] for arm in a.arms}
    for _ in range(a.reps):
        for arm in rows:
            cmd = [sys.executable, "-m", "bench.live_work", "--arm", arm, "--reps", "1", "--steps", str(a.steps)]
            out = subprocess.run(
                cmd + (["--model", a.model] if a.model else []), cwd=ROOT, capture_output=True, text=True
            )
            rows[arm] += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    print(f"## 3. one visitor through the hub ({a.steps} steps, live attack on), arms alternating")
    labels = {
        "thread": "live work in a second thread",
        "thread-one": "the same, the last checkpoint drawn in one thread",
        "between": "live work between steps",
        "dlib-here": "the same, dlib's descriptors in the hub's process (the face worker off)",
    }
    for arm in rows:
        label = labels[arm]
        r = rows[arm]
        first = ", ".join(f"{x['first']:.1f}" for x in r if x["first"] is not None) or "none"
        done = ", ".join(f"{x['done']:.1f}" for x in r)
        tail = ", ".join(f"{x['tail']:.1f}" for x in r)
        print(f"{label}: first reconstruction {first} s; done {done} s; last step to done {tail} s")


def main(argv=None) -> None:
    a = parse(LiveWorkArgs, argv, description=__doc__)
    if a.arm:
        return hub_arm(a)
    from core.model.pipeline import image_size_of, load_pipeline

    if {1, 2, 4, 5, 6} & set(a.sections):
        pipe = load_pipeline(a.model or None, threads=1)
        if 1 in a.sections:
            sampling(pipe)
        photos = example_photos(image_size_of(pipe))
        if 4 in a.sections:
            dlib_beside(pipe, photos)
        if 5 in a.sections:
            trainer_cores(pipe, photos)
        if 6 in a.sections:
            optimizer_step(pipe)
        if 2 in a.sections:
            threads(pipe, photos)
    if 3 in a.sections:
        hub(a)


if __name__ == "__main__":
    main()
