"""How the fine-tune defaults were chosen: ``python -m bench.finetune_recipe``.

Runs a small grid of recipes (steps x learning rate x rank) on the *last* ``--n`` victim identities
(the evaluation in ``core.studies.finetune`` uses the first 20, so tuning never sees them) and prints,
per recipe: mean dlib distance of the trigger samples to the private photos, the share of victims
that beat the base-model floor, and the mean fine-tune time on this machine.
"""

from __future__ import annotations

import argparse
import itertools

from core.events import drain
from core.faces import data
from core.finetune.lora import FinetuneConfig
from core.studies.finetune import run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--steps", default="100,150,250")
    ap.add_argument("--lr", default="1e-3,2e-3,4e-3")
    ap.add_argument("--rank", default="4")
    ap.add_argument("--batch", default="4")
    a = ap.parse_args(argv)
    offset = len(data.Split.load().victims) - a.n
    rows = []
    for steps, lr, rank, batch in itertools.product(
        *(map(float, x.split(",")) for x in (a.steps, a.lr, a.rank, a.batch))
    ):
        cfg = FinetuneConfig(
            steps=int(steps),
            lr=lr,
            rank=int(rank),
            alpha=float(rank),
            batch=int(batch),
            checkpoint_every=0,
            preview_n=0,
        )
        s = drain(run(a.n, cfg, offset=offset)).summary
        rows.append(
            (
                int(steps),
                lr,
                int(rank),
                s["mean_distance_trigger"],
                s["mean_distance_floor"],
                s["fraction_beats_floor"],
                s["mean_seconds"],
            )
        )
        print(
            f"steps {int(steps):>4}  lr {lr:.0e}  rank {int(rank):>2}  batch {int(batch)}+{int(batch)}:  trigger "
            f"{rows[-1][3]:.3f}  floor {rows[-1][4]:.3f}  beats floor {rows[-1][5]:.0%}  {rows[-1][6]:.1f} s",
            flush=True,
        )
    best = min(rows, key=lambda r: r[3])
    print(
        f"closest to the photos: steps {best[0]}, lr {best[1]:.0e}, rank {best[2]} (trigger distance {best[3]:.3f}, "
        f"{best[6]:.1f} s)"
    )


if __name__ == "__main__":
    main()
