"""Memory over many visitors: consecutive fine-tunes through the app's own Train handler, RSS after each.

    python -m bench.memory_growth [--runs 30] [--steps 80] [--model FOLDER_OR_ID]

Each run is one visitor: a fresh session holding the example face's crops, the Fine-tune tab's
``train_run`` (fine-tune, live attack at every checkpoint, previews, export, utility score) consumed
to the end, then the session closed as when the browser tab closes. The resident set size (RSS) of
this process is read after each run (after ``gc.collect()``) and printed next to its growth over the
first run's; the issue's target is < 10 % after 30 runs. Run beside other jobs with
``OMP_WAIT_POLICY=PASSIVE LEAKLAB_THREADS=1``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import psutil

from core.engine import Engine
from ui.finetune_tab import MAX_PHOTOS, example_sets, read_faces, train_run
from ui.session import VisitorSession

TARGET = 10.0  # per cent


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def one_visitor(engine: Engine, crops, steps: int, seed: int) -> str:
    session = VisitorSession(crops=list(crops))
    try:
        for update in train_run(engine, session, steps, 4, 3e-3, seed, False):
            last = update
        return last.get("status", "")
    finally:
        session.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--steps", type=int, default=80, help="fine-tuning steps per run (the app's default: 80)")
    ap.add_argument("--model", default=None, help="model folder or hub id (default: the embedded model)")
    a = ap.parse_args(argv)
    engine = Engine(a.model)
    crops, refused = read_faces(next(iter(example_sets().values())), engine.image_size)
    crops = crops[:MAX_PHOTOS]
    print(f"model {engine.model_name} on {engine.device}; {len(crops)} example crops; {a.runs} runs of {a.steps} steps")
    first = None
    for i in range(a.runs):
        t0 = time.perf_counter()
        status = one_visitor(engine, crops, a.steps, seed=i)
        mb = rss_mb()
        first = first or mb
        growth = 100 * (mb - first) / first
        print(
            f"run {i + 1:2d}: {time.perf_counter() - t0:5.1f} s  RSS {mb:7.1f} MB  growth {growth:+5.1f} %  "
            f"{'ok' if status.startswith('Done') else 'NOT DONE: ' + status[:60]}",
            flush=True,
        )
    print(
        f"RSS growth after {a.runs} fine-tunes vs the first: {growth:+.1f} % (target < {TARGET:g} %: "
        f"{'met' if growth < TARGET else 'NOT met'})"
    )
    return 0 if growth < TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
