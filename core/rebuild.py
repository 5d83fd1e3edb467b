"""Everything downstream of the embedded base, rebuilt in order: ``python -m core.rebuild``.

When ``assets/base`` changes, every asset trained on it (example faces, shadow LoRAs and the
attacker, the watermarks) and every number measured on it (``docs/results``, the README) is stale.
This runs the commands that made them, the same ones each asset's record and the README name, one
after another in the order their inputs need:

    examples -> drawn-face rule -> shadow LoRAs -> attacker -> AIAO -> backdoor
    -> studies (base, fine-tune, attack, layers, watermark, defenses, cloaking, membership) -> benches

Each stage runs in its own process (they are ordinary command-line entry points; one that fails
leaves the outputs of the others), and the stages finished on the base now in ``assets/base`` (its
hash) are recorded in ``docs/results/rebuild.json``, next to the outputs they made: committed with
them, the record lets a fresh clone on another machine go on where the last commit stopped, and it
tells a reader how long each stage took. Rerunning the same command after a stop (Ctrl-C, a session
ending, a restart) resumes at the first stage not finished, and the long stages resume inside too on
the same machine (shadow LoRAs, victims' LoRAs, cloaks and scores are cached per base). A changed
base starts over. ``--dry-run`` prints the plan; ``--only``/``--skip`` pick stages.

Why a module and not a Makefile: the stages' inputs are model weights and caches keyed by the
base's hash, not files with useful timestamps, and the record must survive a stop mid-stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core import ASSETS, PROJECT_ROOT
from core.cli import Switch
from core.events import Done, Message, Progress, never, run_with_progress_bar

OLD_BASE_COMMIT = "47894ed"  # the 64 px LFW base the 128 px base is measured against


@dataclass(frozen=True)
class Stage:
    name: str
    argv: tuple[str, ...]  # after ``python -m``
    log: str | None = None  # stdout is also written here (relative to the project root): benches


def stages(compare: str | None) -> list[Stage]:
    """The plan, in order (``compare``: the older base the base study measures beside the new one)."""
    wm = "assets/watermark"
    old = ("--compare", "old")  # the benches time the older base in the same run where git history holds it
    return [
        Stage("examples", ("core.model.examples",)),
        Stage("drawn-faces", ("core.faces.drawn", "--n", "250", "--n-more", "2000")),
        Stage("shadow", ("core.attack.shadow", "--n", "128", "--group", "16")),
        Stage("attacker", ("core.attack.train", "--steps", "254", "--loras-per-step", "16")),
        Stage(
            "aiao",
            # 2400 steps: 1200 (the default, enough on the 64 px base) left VS 94.5 % on the 128 px base
            ("core.watermark", "embed-aiao", "--out", f"{wm}/aiao.safetensors", "--key", f"{wm}/aiao_key.json")
            + ("--steps", "2400"),
        ),
        Stage(
            "backdoor",
            tuple(
                f"core.watermark embed-backdoor --out {wm}/backdoor.safetensors --key {wm}/backdoor_key.json "
                "--latents 512 --steps 1600 --lr 2e-4 --token-lr 1e-2 --pattern-weight 2".split()
            ),
        ),
        Stage("study-base", ("core.studies.base", *(("--compare", compare) if compare else ()))),
        Stage("study-finetune", ("core.studies.finetune",)),
        Stage("study-attack", ("core.studies.attack", "--n", "50")),
        Stage("study-layers", ("core.studies.layers", "--n", "20", "--full-n", "5")),
        Stage("study-watermark", ("core.studies.watermark", "--n-clean", "20")),
        Stage("study-defenses", ("core.studies.defenses", "--n", "20")),
        Stage("study-cloaking", ("core.studies.cloaking", "--n", "20")),
        Stage("study-membership", ("core.studies.membership", "--n", "20", "--n-calibration", "20")),
        Stage("bench-finetune", ("bench.finetune_speed", *old), log="docs/results/bench_finetune_speed.txt"),
        Stage("bench-attack", ("bench.attack_speed", *old), log="docs/results/bench_attack_speed.txt"),
        Stage("bench-cold-start", ("bench.cold_start", *old), log="docs/results/bench_cold_start.txt"),
        Stage("bench-cloak", ("bench.cloak_speed",), log="docs/results/bench_cloak_speed.txt"),
    ]


def base_hash(folder: Path = ASSETS / "base") -> str:
    """A hash of every file of the base model's folder (names and bytes)."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def old_base(commit: str = OLD_BASE_COMMIT) -> str | None:
    """The older base's folder, extracted once from git history into the cache (with the attacker
    trained for it: :func:`old_attacker`); None outside a git checkout (the base study then measures
    the new base alone)."""
    from core.model.prior import cache_dir

    dest = cache_dir() / f"base-{commit}"
    wanted = ("assets/base/model_index.json", "assets/attacker/attacker.safetensors")
    if all((dest / w).exists() for w in wanted):
        return str(dest / "assets" / "base")
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "archive", commit, "assets/base", "assets/attacker"],
        capture_output=True,
        check=False,
    )
    if archive.returncode:
        return None
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return str(dest / "assets" / "base")


def old_attacker(commit: str = OLD_BASE_COMMIT) -> str | None:
    """The weight-only attacker trained for the older base (same extraction as :func:`old_base`)."""
    base = old_base(commit)
    return None if base is None else str(Path(base).parent / "attacker" / "attacker.safetensors")


RECORD = PROJECT_ROOT / "docs" / "results" / "rebuild.json"


class Record:
    """Which stages finished on one base: ``{"base": hash, "stages": {name: {command, seconds}}}``,
    a JSON file rewritten atomically after each stage; a record of another base counts as empty."""

    def __init__(self, path: Path, base: str):
        self.path, self.base = path, base
        doc = json.loads(path.read_text()) if path.exists() else {}
        self.done = doc.get("stages", {}) if doc.get("base") == base else {}

    @classmethod
    def of_base(cls) -> Record:
        """The record of the base now in ``assets/base``."""
        return cls(RECORD, base_hash())

    def finish(self, stage: Stage, seconds: float) -> None:
        self.done[stage.name] = {"command": "python -m " + " ".join(stage.argv), "seconds": round(seconds)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"base": self.base, "stages": self.done}, indent=1) + "\n")
        tmp.replace(self.path)


def run_stage(stage: Stage, should_stop, poll: float = 1.0) -> int | None:
    """Run one stage in its own process; its exit code, or None when stopped (the process gets
    SIGTERM, which the long commands answer by saving their state)."""
    out = open(PROJECT_ROOT / stage.log, "w") if stage.log else None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", *stage.argv], cwd=PROJECT_ROOT, stdout=subprocess.PIPE if out else None, text=True
        )
        if out:  # a bench: its report goes to the terminal and to its file
            for line in proc.stdout:
                sys.stdout.write(line)
                out.write(line)
                if should_stop():
                    break
        while proc.poll() is None:
            if should_stop():
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                return None
            time.sleep(poll)
        return proc.returncode
    finally:
        if out:
            out.close()


@dataclass
class RebuildConfig:
    only: tuple[str, ...] = ()  # run only these stages (names as --dry-run prints them)
    skip: tuple[str, ...] = ()  # leave these stages out
    again: Switch = False  # run stages already finished on this base too
    compare: str | None = None  # older base for the base study (default: git history's 64 px LFW base)


def rebuild(cfg: RebuildConfig, should_stop=never, runner=run_stage):
    """Generator: a Progress per stage, Messages; Done({"done": [...], "failed": name or None})."""
    plan = stages(cfg.compare or old_base())
    unknown = (set(cfg.only) | set(cfg.skip)) - {s.name for s in plan}
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; the stages are {[s.name for s in plan]}")
    plan = [s for s in plan if (not cfg.only or s.name in cfg.only) and s.name not in cfg.skip]
    record = Record.of_base()
    t0, done = time.time(), []
    for i, stage in enumerate(plan, 1):
        if stage.name in record.done and not cfg.again:
            yield Message(f"{stage.name}: finished on this base already, skipped")
        else:
            yield Message(f"{stage.name}: python -m {' '.join(stage.argv)}")
            t = time.time()
            rc = runner(stage, should_stop)
            if rc is None:
                yield Done({"done": done, "failed": None}, cancelled=True)
                return
            if rc:
                yield Message(f"{stage.name} failed (exit {rc}); fix it and rerun: finished stages are kept")
                yield Done({"done": done, "failed": stage.name})
                return
            record.finish(stage, time.time() - t)
            yield Message(f"{stage.name}: done in {(time.time() - t) / 60:.1f} min")
        done.append(stage.name)
        yield Progress("rebuild", i, len(plan), time.time() - t0)
    yield Done({"done": done, "failed": None})


@dataclass
class Args(RebuildConfig):
    """Rebuild every asset and study downstream of assets/base, in order, resumable."""

    dry_run: Switch = False  # print the plan and what is finished on this base, run nothing


def main(argv=None):
    from core.cli import config_of, parse
    from core.events import stop_on_signals

    a = parse(Args, argv, description=__doc__)
    if a.dry_run:
        record = Record.of_base()
        for s in stages(a.compare or "<old base>"):
            mark = "done" if s.name in record.done else "    "
            print(f"{mark}  {s.name:18s} python -m {' '.join(s.argv)}")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run_with_progress_bar(rebuild(config_of(a, RebuildConfig), stop_on_signals()))
    if result and result.get("failed"):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
