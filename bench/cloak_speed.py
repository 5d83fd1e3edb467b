"""Cloaking time for 5 photos (target <= 10 s on the app's CPU at the default budget), next to the
fine-tune it protects against, measured in the same run on the same photos.

    python -m bench.cloak_speed [--repeats 2] [--cores 1,2]

On the shipped base (``assets/base``) and the example face's 5 photos, best of ``--repeats``, each
cloak on every number of cores of ``--cores`` (``protect_photos(cores=n)``: the app gives a cloak
every core while no fine-tune runs or waits, else one):
- the default cloak (:class:`core.defenses.cloak.CloakConfig`: ASPL-style surrogate LoRA);
- the cheaper variant, PGD against the frozen base alone (``surrogate="base"``), same steps;
- the default with half the PGD steps and two noise draws per step (half the autoencoder passes);
- the baseline: the default 80-step fine-tune on the same photos (class images cached first).
Each line gives the mean PSNR of the cloaked photos and the surrogate's loss on them over its loss on the
originals (what the cloak achieved for its time).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import ASSETS  # noqa: E402
from core.cli import parse  # noqa: E402
from core.defenses.cloak import CloakConfig, protect_photos  # noqa: E402
from core.events import drain  # noqa: E402


@dataclass
class Args:
    repeats: int = 2  # timed runs of each part (the best is reported)
    cores: str = "1,2"  # the cloak's cores, each timed (the app gives it every core while no fine-tune runs)


def best(fn, n: int) -> tuple[float, object]:
    ts, out = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), out


def example_photos(size: int) -> list:
    from core.faces.ingest import ingest_face

    return [
        ingest_face(p.read_bytes(), size=size).crop
        for p in sorted((ASSETS / "examples" / "person_1000").glob("*.png"))[:5]
    ]


def variants() -> dict:
    """The cloaks timed: the default, the cheaper base-only variant, and a shorter default (half the
    PGD steps, two noise draws each: half the autoencoder passes, which dominate at 128 px)."""
    cfg = CloakConfig()
    return {
        "default (surrogate LoRA)": cfg,
        "base alone": replace(cfg, surrogate="base"),
        f"{cfg.steps // 2} steps x 2 draws": replace(
            cfg, steps=cfg.steps // 2, noises=2, surrogate_every=cfg.steps // 2
        ),
    }


def time_cloaks(pipe, photos, repeats: int, cores=(1,)) -> dict:
    """{variant (on n cores): (seconds, mean PSNR, surrogate loss cloaked / clean)}."""
    out = {}
    for name, cfg in variants().items():
        for n in cores:
            job = lambda cfg=cfg, n=n: drain(protect_photos(pipe, photos, cfg, cores=n)).cloak  # noqa: E731
            t, res = best(job, repeats)
            out[f"{name}, {n} core{'s' if n > 1 else ''}"] = (
                t,
                sum(res.psnr) / len(res.psnr),
                res.loss_cloaked / res.loss_clean,
            )
    return out


def report(title: str, times: dict, baseline: float | None = None) -> None:
    print(title)
    for name, (t, p, gain) in times.items():
        base = f"; {t / baseline:.2f}x the fine-tune" if baseline else ""
        print(
            f"  {name:<34} {t:6.2f} s (target <= 10 s: {'met' if t <= 10 else 'NOT met'}{base}); mean PSNR {p:.1f} dB; "
            f"surrogate loss cloaked / clean {gain:.2f}x"
        )


def main(argv=None):
    from core.finetune.lora import FinetuneConfig, finetune
    from core.model.pipeline import image_size_of, load_pipeline
    from core.model.prior import class_latents

    a = parse(Args, argv, description=__doc__.split("\n")[0])
    cfg = CloakConfig()
    pipe = load_pipeline(None, threads=1)  # this thread computes on one core, as the app's handlers do
    size = image_size_of(pipe)
    photos = example_photos(size)
    print(
        f"calling thread on {torch.get_num_threads()} core(s), best of {a.repeats}, 5 photos at {size} px; "
        f"cloak: budget "
        f"{cfg.budget:g}/255, {cfg.steps} PGD steps, surrogate LoRA trained {cfg.surrogate_steps} steps every "
        f"{cfg.surrogate_every} PGD steps"
    )
    class_latents(pipe, FinetuneConfig().n_class)  # cached before timing, as in the app
    t_ft, _ = best(lambda: drain(finetune(pipe, photos, FinetuneConfig(checkpoint_every=0, preview_n=0))), a.repeats)
    print(f"baseline, the default 80-step fine-tune on the same photos: {t_ft:.2f} s")
    cores = tuple(int(c) for c in a.cores.split(","))
    report("shipped base:", time_cloaks(pipe, photos, a.repeats, cores), t_ft)


if __name__ == "__main__":
    main()
