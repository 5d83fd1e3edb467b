"""A workshop through the real app: N visitors upload the example face and press Train within a few
seconds, each as their own browser session (``gradio_client``), once with the training hub batching
them and once with batching off (``--max-batch 1``: one fine-tune at a time), in one run.

    python -m bench.workshop [--visitors 16] [--steps 80] [--spread 10] [--max-batch 0] [--model M]

Each arm starts ``app.py`` in its own process (so its RSS is the app's alone) and prints, per visitor:
the deepest place in the queue the visitor was shown, seconds from pressing Train to the first live
reconstruction and to "Done"; then p50 / p95 over visitors, and the app's RSS before the room (after
one warm-up visit, which loads the attacker and the floor images once) and after it. The batched
arm's p95 time to done is compared with the sequential arm's (the issue's target: at most half).
``--visitors 1`` times a single visitor (targets: first reconstruction <= 8 s, done <= 25 s).
The app compiles its one-visitor fine-tune step at start-up (``app.py --compile``, its default):
the bench waits for that before the room comes (``--compile False`` runs the app with
``--compile False``); ``--sequential False`` skips the one-at-a-time arm (e.g. RSS over 30 visitors).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from core.cli import parse

ROOT = Path(__file__).resolve().parents[1]
# the Train event's outputs as the API returns them (ui.finetune_tab.FINETUNE_OUTPUTS without the session)
STATUS, ATTACK_GALLERY = 0, 7


@dataclass
class WorkshopArgs:
    visitors: int = 16  # simulated visitors, each its own browser session
    steps: int = 80  # fine-tuning steps per visitor (the app's default: 80)
    spread: float = 10.0  # the visitors press Train at random moments within this many seconds
    max_batch: int = 0  # the batched arm's batch size (0: the app's default for this hardware)
    model: str = ""  # model folder or hub id (default: the embedded model)
    seed: int = 0  # seed of the visitors' press times
    timeout: float = 3600.0  # seconds one arm may take before the bench gives up on it
    compile: bool = True  # the app compiles its fine-tune step at start (its default); the room waits for it
    sequential: bool = True  # also run the room one at a time (False: the batched arm alone, e.g. RSS at 30)


@dataclass
class Visit:
    queue_place: int = 0  # deepest place in the queue the status showed (0: never waited)
    first_reconstruction: float | None = None  # seconds from Train to the first reconstruction shown
    done: float | None = None  # seconds from Train to "Done"
    loras: set = field(default_factory=set)  # the LoRA file the visitor was offered last
    error: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """``app.py`` in its own process; its stderr is read all along (a full pipe would block the app)."""

    def __init__(self, port: int, a: WorkshopArgs, max_batch: int):
        cmd = [sys.executable, "app.py", "--port", str(port)]
        cmd += ["--max-batch", str(max_batch)] if max_batch else []
        cmd += ["--model", a.model] if a.model else []
        cmd += [] if a.compile else ["--compile", "False"]
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                time.sleep(0.5)
                raise RuntimeError(f"the app exited: {''.join(self.lines)[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError("the app did not start within 300 s")

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float) -> str:
        """The first line of the app's stderr holding ``text`` (waiting up to ``timeout`` s), or ""."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((line.strip() for line in list(self.lines) if text in line), "")
            if hit or self.proc.poll() is not None:
                return hit
            time.sleep(1)
        return ""


def visitor(url: str, photos: list[str], a: WorkshopArgs, delay: float, seed: int, out: Visit) -> None:
    from gradio_client import Client, handle_file

    c = Client(url, verbose=False, download_files=False)
    try:
        c.predict([handle_file(p) for p in photos], api_name="/ingest")
        time.sleep(delay)
        t0 = time.monotonic()
        job = c.submit(a.steps, 4, 3e-3, seed, False, api_name="/train")
        seen = 0
        while not job.done() or seen < len(job.outputs()):
            outs = job.outputs()
            for o in outs[seen:]:
                read_update(o, time.monotonic() - t0, out)
            seen = len(outs)
            time.sleep(0.05)
        job.result()  # raises what the app raised
    except Exception as e:  # one visitor's failure is reported, the others go on
        out.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        c.close()


def gallery_files(value) -> list:
    """The images of a gallery output (a list, or an update whose value is one; empty at the start)."""
    if isinstance(value, dict):
        value = value.get("value")
    return list(value) if isinstance(value, list) else []


def read_update(o, t: float, out: Visit) -> None:
    status = str(o[STATUS] or "")
    m = re.search(r"number \*\*(\d+)\*\* in the queue", status)
    if m:
        out.queue_place = max(out.queue_place, int(m.group(1)))
    if out.first_reconstruction is None and gallery_files(o[ATTACK_GALLERY]):
        out.first_reconstruction = t
    if status.startswith("**Done") or status.startswith("Done"):
        out.done = out.done or t
    if o[4]:
        out.loras = {str(o[4].get("path") if isinstance(o[4], dict) else o[4])}  # the file offered last


def arm(a: WorkshopArgs, photos: list[str], max_batch: int) -> tuple[list[Visit], float, float]:
    """One run of the workshop against a fresh app: (visits, RSS before, RSS after) in MiB."""
    port = free_port()
    started = App(port, a, max_batch)
    proc = started.proc
    try:
        app = psutil.Process(proc.pid)
        url = f"http://127.0.0.1:{port}/"
        if a.compile:
            line = started.wait_for("training hub: ", 1800)
            print(f"(max batch {max_batch or 'default'}) {line or 'the app said nothing of its compile in 30 min'}")
        warm = Visit()
        visitor(url, photos, a, 0.0, 10_000, warm)  # loads what the first visit loads (attacker, floor, ...)
        if warm.error:
            raise RuntimeError(f"the warm-up visit failed: {warm.error}")
        rss0 = app.memory_info().rss / 2**20
        rng = np.random.default_rng(a.seed)
        visits = [Visit() for _ in range(a.visitors)]
        threads = [
            threading.Thread(
                target=visitor,
                daemon=True,
                args=(url, photos, a, float(rng.uniform(0, a.spread)), i, v),
            )
            for i, v in enumerate(visits)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join(a.timeout)
        return visits, rss0, app.memory_info().rss / 2**20
    finally:
        proc.terminate()
        proc.wait(30)


def pct(xs, q):
    xs = [x for x in xs if x is not None]
    return f"{np.percentile(xs, q):6.1f}" if xs else "     -"


def report(name: str, visits: list[Visit], rss0: float, rss1: float) -> float | None:
    print(f"\n## {name}\n\n| visitor | deepest queue place | first reconstruction (s) | done (s) |\n|---|---|---|---|")
    for i, v in enumerate(visits):
        first = f"{v.first_reconstruction:.1f}" if v.first_reconstruction is not None else "-"
        done = f"{v.done:.1f}" if v.done is not None else (v.error or "not done")
        print(f"| {i} | {v.queue_place} | {first} | {done} |")
    firsts, dones = [v.first_reconstruction for v in visits], [v.done for v in visits]
    print(
        f"\np50 / p95 first reconstruction: {pct(firsts, 50)} / {pct(firsts, 95)} s; "
        f"done: {pct(dones, 50)} / {pct(dones, 95)} s; finished {sum(d is not None for d in dones)}/{len(visits)}"
    )
    print(
        f"app RSS: {rss0:.0f} MiB before the room (after one warm-up visit), {rss1:.0f} MiB after "
        f"({100 * (rss1 - rss0) / rss0:+.1f} %; target < +10 %)"
    )
    loras = [lo for v in visits for lo in v.loras]
    print(f"LoRA files: {len(set(loras))} distinct for {len(visits)} visitors (each must get their own)")
    done = [d for d in dones if d is not None]
    return float(np.percentile(done, 95)) if len(done) == len(visits) else None


def main(argv=None):
    a = parse(WorkshopArgs, argv, description=__doc__)
    from ui.finetune_tab import example_sets

    sets = example_sets()
    if not sets:
        sys.exit("no example faces in assets/examples: build them first (README, 'Rebuilding the assets')")
    photos = next(iter(sets.values()))[:4]
    print(
        f"{a.visitors} visitors, {a.steps} steps each, pressing Train within {a.spread:.0f} s; "
        f"{os.cpu_count()} CPU cores; {len(photos)} example photos each"
    )
    batched = report(f"batched (max batch {a.max_batch or 'default'})", *arm(a, photos, a.max_batch))
    sequential = report("sequential (max batch 1)", *arm(a, photos, 1)) if a.sequential else None
    if batched and sequential:
        print(
            f"\np95 time to done: batched {batched:.1f} s vs sequential {sequential:.1f} s "
            f"= {batched / sequential:.2f} of it (target <= 0.5)"
        )


if __name__ == "__main__":
    main()
