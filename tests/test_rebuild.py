"""core.rebuild: the downstream rebuild runs its stages in order, records what finished per base,
resumes after a stop or a failure, and starts over on another base."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from core import ASSETS, rebuild
from core.events import drain


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAKLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(rebuild, "RECORD", tmp_path / "rebuild.json")
    return tmp_path / "cache"


class Runner:
    """Stands in for the stage processes: records what ran, fails or stops where told."""

    def __init__(self, fail=None, stop_at=None):
        self.ran, self.fail, self.stop_at = [], fail, stop_at

    def __call__(self, stage, should_stop):
        if stage.name == self.stop_at:
            return None
        self.ran.append(stage.name)
        return 3 if stage.name == self.fail else 0


def names(compare="old"):
    return [s.name for s in rebuild.stages(compare)]


def test_plan_order_puts_inputs_first():
    n = names()
    assert n.index("shadow") < n.index("attacker") < n.index("study-attack")
    assert n.index("aiao") < n.index("study-watermark")
    assert n.index("examples") < n.index("drawn-faces")
    base = next(s for s in rebuild.stages("old") if s.name == "study-base")
    assert base.argv[-2:] == ("--compare", "old")


def test_runs_in_order_and_resumes_after_a_failure(cache):
    cfg = rebuild.RebuildConfig(compare="old")
    first = Runner(fail="attacker")
    out = drain(rebuild.rebuild(cfg, runner=first))
    assert out == {"done": ["examples", "drawn-faces", "shadow"], "failed": "attacker"}
    assert first.ran == ["examples", "drawn-faces", "shadow", "attacker"]
    second = Runner()
    out = drain(rebuild.rebuild(cfg, runner=second))
    assert second.ran == names()[3:]  # the failed stage again, then the rest; finished ones skipped
    assert out["done"] == names() and out["failed"] is None
    third = Runner()
    drain(rebuild.rebuild(rebuild.RebuildConfig(compare="old", again=True, only=("shadow",)), runner=third))
    assert third.ran == ["shadow"]


def test_a_stop_keeps_finished_stages(cache):
    cfg = rebuild.RebuildConfig(compare="old")
    events = list(rebuild.rebuild(cfg, runner=Runner(stop_at="aiao")))
    assert events[-1].cancelled
    again = Runner()
    drain(rebuild.rebuild(cfg, runner=again))
    assert again.ran[0] == "aiao"


def test_another_base_starts_over(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(rebuild, "base_hash", lambda: "first")
    drain(rebuild.rebuild(rebuild.RebuildConfig(compare="old"), runner=Runner()))
    monkeypatch.setattr(rebuild, "base_hash", lambda: "second")
    r = Runner()
    drain(rebuild.rebuild(rebuild.RebuildConfig(compare="old"), runner=r))
    assert r.ran == names()
    assert json.loads((tmp_path / "rebuild.json").read_text())["base"] == "second"


def test_base_hash_sees_every_byte(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(ASSETS / "base", base, ignore=shutil.ignore_patterns("*.safetensors"))
    before = rebuild.base_hash(base)
    assert rebuild.base_hash(base) == before
    (base / "model_index.json").write_text((base / "model_index.json").read_text() + " ")
    assert rebuild.base_hash(base) != before


def test_only_and_skip(cache):
    r = Runner()
    cfg = rebuild.RebuildConfig(compare="old", only=("examples", "shadow", "attacker"), skip=("shadow",))
    drain(rebuild.rebuild(cfg, runner=r))
    assert r.ran == ["examples", "attacker"]
    with pytest.raises(ValueError, match="unknown stages"):
        drain(rebuild.rebuild(rebuild.RebuildConfig(only=("nope",), compare="old"), runner=r))


def test_run_stage_runs_a_process_writes_its_log_and_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(rebuild, "PROJECT_ROOT", tmp_path)
    assert rebuild.run_stage(rebuild.Stage("platform", ("platform",), log="out.txt"), lambda: False) == 0
    assert (tmp_path / "out.txt").read_text().strip()
    assert rebuild.run_stage(rebuild.Stage("fails", ("json.tool", "no-such-file")), lambda: False) != 0
    sleeper = rebuild.Stage("sleep", ("timeit", "-n", "1", "-r", "1", "-s", "import time", "time.sleep(60)"))
    assert rebuild.run_stage(sleeper, lambda: True, poll=0.1) is None


def test_old_base_comes_from_git_history(cache):
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    folder = rebuild.old_base()
    if folder is None:
        pytest.skip("not a git checkout with the old base's commit")
    assert (cache / f"base-{rebuild.OLD_BASE_COMMIT}").is_dir()
    assert (Path(folder) / "model_index.json").is_file()
    assert Path(rebuild.old_attacker()).is_file()  # the attacker trained for it comes along
    assert rebuild.old_base() == folder  # extracted once


def test_list_prints_the_plan(cache, capsys):
    rebuild.main(["--dry-run", "--compare", "old"])
    out = capsys.readouterr().out
    assert all(n in out for n in names()) and sys.executable not in out
