"""``python -m core.layers PHOTOS...``: busy and lazy layers of a fine-tune on photos of one face
(Liu et al., arXiv 2405.00466): the ranking, the change over the steps, and the swap curve."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tyro

from core.finetune.full import FULL_LR, full_finetune
from core.layers.change import (
    TAU,
    LayerChange,
    base_state,
    concentration,
    full_layer_change,
    lora_layer_change,
    rank_layers,
    trajectory_changes,
    trajectory_from_changes,
    vector_change,
)
from core.layers.swap import SwapRow, full_swap_curve, swap_curve


def format_ranking(changes: list[LayerChange], n: int = 10) -> str:
    busy, lazy = rank_layers(changes, n)
    lines = [
        f"relative change = ||dW||_F / ||W0||_F; moved = share of entries with |dW| > {TAU:g} x mean|W0|",
        f"{len(changes)} layers; the {n} busiest hold {100 * concentration(changes, n):.1f} % of sum ||dW||^2",
    ]
    for title, rows in (("busiest", busy), ("laziest", lazy)):
        lines.append(f"-- {title} --")
        lines += [
            f"{i:3d}. {c.relative:9.3%}  moved {c.moved:6.1%}  {c.kind:8s} {c.name}" for i, c in enumerate(rows, 1)
        ]
    return "\n".join(lines)


def format_swap(rows: list[SwapRow]) -> str:
    lines = ["layers kept (busiest k) | dlib distance with the true trigger | floor (base, class prompt)"]
    lines += [f"{r.k:4d} of {r.n_layers:4d} | {r.distance:.3f} | {r.floor:.3f}" for r in rows]
    return "\n".join(lines)


@dataclass
class Args:
    """Busy and lazy layers of a fine-tune on photos of one face (Liu et al., arXiv 2405.00466)."""

    photos: tyro.conf.Positional[tuple[str, ...]] = ()  # 3-10 photos of one face
    steps: int | None = None  # fine-tuning steps (default: the LoRA recipe's, 80)
    full: bool = False  # full fine-tune of the UNet instead of the default LoRA
    lr: float | None = None  # learning rate (default: the LoRA recipe's, or FULL_LR with --full)
    seed: int = 0  # seed of the fine-tune
    snapshots: int = 8  # checkpoints recorded for the trajectory
    ks: tuple[str, ...] = ("1", "3", "10", "30", "all")  # swap-curve layer counts ("all": every layer; none: no curve)
    out: str | None = None  # JSON file to write (e.g. docs/results/layers.json)
    model: str | None = None  # base model folder or hub id (default: the embedded base)
    device: str | None = None  # torch device (default: CUDA when present)


def lora_run(pipe, crops, steps: int, seed: int, every: int, lr: float | None):
    """LoRA fine-tune with its checkpoints: (result, changes, trajectory, extra record)."""
    from core.events import Checkpoint, run_with_progress_bar
    from core.finetune.lora import FinetuneConfig, finetune

    cfg = FinetuneConfig(steps=steps, seed=seed, checkpoint_every=every, preview_n=0, **({"lr": lr} if lr else {}))
    ckpts = {}

    def events():
        for ev in finetune(pipe, crops, cfg):
            if isinstance(ev, Checkpoint):
                ckpts[ev.step] = ev.lora
            yield ev

    res = run_with_progress_bar(events())
    extra = {"rank": cfg.rank, "alpha": cfg.alpha, "lr": cfg.lr}
    return res, lora_layer_change(pipe, res.lora, cfg.alpha), trajectory_changes(pipe, ckpts, cfg.alpha), extra


def full_run(pipe, crops, steps: int, seed: int, every: int, lr: float | None):
    """Full UNet fine-tune: (result, changes, trajectory, extra record)."""
    from core.events import run_with_progress_bar

    res = run_with_progress_bar(full_finetune(pipe, crops, steps, lr or FULL_LR, seed, checkpoint_every=every))
    extra = {"vector_change": vector_change(base_state(pipe), res.state), "lr": lr or FULL_LR}
    return res, full_layer_change(base_state(pipe), res.state), trajectory_from_changes(res.trajectory), extra


def main(argv=None):
    from core.cli import parse
    from core.faces.ingest import IngestError, ingest_face
    from core.finetune.lora import FinetuneConfig
    from core.model.pipeline import image_size_of, load_pipeline

    a = parse(Args, argv)
    pipe = load_pipeline(a.model, a.device)
    crops = []
    for p in a.photos:
        try:
            crops.append(ingest_face(p, size=image_size_of(pipe)).crop)
        except IngestError as e:
            print(f"skipped {p}: {e}")
    steps = a.steps or FinetuneConfig.steps
    every = max(1, steps // max(1, a.snapshots))
    ks = [None if k.strip() == "all" else int(k) for k in a.ks if k.strip()]
    t0 = time.perf_counter()
    res, changes, traj, extra = (full_run if a.full else lora_run)(pipe, crops, steps, a.seed, every, a.lr)
    print(
        f"fine-tuned {'the full UNet' if a.full else 'a LoRA'}: {res.steps_done} steps in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    print(format_ranking(changes))
    rows = []
    if ks:
        rows = (
            full_swap_curve(pipe, res.state, res.trigger, crops, ks, changes=changes)
            if a.full
            else swap_curve(pipe, res.lora, res.trigger, crops, ks, extra["alpha"], changes=changes)
        )
        print(format_swap(rows))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "kind": "full" if a.full else "lora",
            "steps": res.steps_done,
            "seed": a.seed,
            "photos": len(crops),
            "tau": TAU,
            **extra,
            "layers": [asdict(c) for c in changes],
            "trajectory": {"steps": traj.steps, "names": traj.names, "relative": traj.matrix.tolist()},
            "swap": [asdict(r) for r in rows],
        }
        out.write_text(json.dumps(doc, indent=1))
        print(f"-> {out}")


if __name__ == "__main__":
    main()
