"""App cold start: from ``python app.py`` to the first page served, on the embedded model.

    python -m bench.cold_start [--repeats 3] [--compare old]

Each run starts the app in a fresh process (a free port, ``HF_HUB_OFFLINE=1``, the default flags:
the fine-tune step compiles in the background while the app serves, so it is not waited for) and
polls ``/`` until it answers 200; the time from the process start to that answer is what a visitor
waits after a Space wakes up. The app is then stopped with SIGTERM (as a Space is). Prints every
run and the median. ``--compare old``: the same runs on the 64 px base the embedded one replaced
(from git history), alternating with the embedded model's, so both see the same machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

from bench.workshop import free_port
from core import PROJECT_ROOT


def cold_start(model: str | None, timeout: float = 300.0) -> float:
    """Seconds from starting the app's process to its first page (raises if it never answers)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("LEAKLAB_MODEL", None)
    cmd = [sys.executable, "app.py", "--port", str(port)] + (["--model", model] if model else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited with {proc.returncode} before serving: {' '.join(cmd)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"no page within {timeout:.0f} s")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare", choices=("old",), default=None, help="also time the 64 px base it replaced")
    a = ap.parse_args(argv)
    models = {"embedded": None}
    if a.compare:
        from core.rebuild import old_base

        folder = old_base()
        if folder is None:
            print("no old base here (not a git checkout holding its commit): comparison left out")
        else:
            models["old 64 px base"] = folder
    times = {name: [] for name in models}
    for _ in range(a.repeats):
        for name, model in models.items():  # alternating: a slow spell of the machine hits both
            times[name].append(cold_start(model))
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    for name, ts in times.items():
        target = " (target <= 15 s)" if name == "embedded" else ""
        print(f"{name}: median {statistics.median(ts):.1f} s over {len(ts)} cold starts{target}")


if __name__ == "__main__":
    main()
