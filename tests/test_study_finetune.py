"""core.studies.finetune as a job on the tiny pipeline: a LoRA per victim scored against its photos,
a Progress per victim, a stop that keeps the victims measured, and the command's report."""

import json

import pytest

from core.events import Done, Progress
from core.finetune.lora import FinetuneConfig
from core.studies.finetune import FinetuneStudyConfig, main, run


def test_command_writes_the_report_with_the_recipe_and_the_command(tiny_pipe, tiny_pipeline_dir, lfw_root, tmp_path):
    main(
        [
            "--model",
            str(tiny_pipeline_dir),
            "--n",
            "2",
            "--steps",
            "2",
            "--rank",
            "2",
            "--out",
            str(tmp_path),
            "--name",
            "ft",
        ]
    )
    doc = json.loads((tmp_path / "ft.json").read_text())
    assert list(doc) == ["config", "summary", "victims", "command"]
    assert doc["config"]["steps"] == 2 and doc["config"]["rank"] == 2 and doc["config"]["alpha"] == 2.0
    assert doc["summary"]["n"] == len(doc["victims"]) == 2 and 0 <= doc["summary"]["top1"] <= 1
    assert doc["command"] == (
        f"python -m core.studies.finetune --model {tiny_pipeline_dir} --n 2 --steps 2 --rank 2 "
        f"--out {tmp_path} --name ft"
    )
    assert doc["command"] in (tmp_path / "ft.md").read_text()


def test_progress_per_victim_and_a_stop_keeps_the_victims_measured(tiny_pipe, tiny_pipeline_dir, lfw_root):
    calls = []
    cfg = FinetuneConfig(steps=2, checkpoint_every=0, preview_n=0, n_class=4)
    events = list(run(3, cfg, str(tiny_pipeline_dir), should_stop=lambda: calls.append(1) or len(calls) > 1))
    assert [(e.step, e.total) for e in events if isinstance(e, Progress)] == [(1, 3)]
    done = events[-1]
    assert isinstance(done, Done) and done.cancelled and done.result.summary["n"] == 1


def test_config_builds_the_recipe_under_test():
    r = FinetuneStudyConfig(steps=40, lr=1e-3, rank=8).recipe()
    assert (r.steps, r.lr, r.rank, r.alpha) == (40, 1e-3, 8, 8.0)
    assert FinetuneStudyConfig().recipe() == FinetuneConfig(checkpoint_every=0, preview_n=0)
    with pytest.raises(ValueError, match="0"):
        FinetuneStudyConfig(n=0)
