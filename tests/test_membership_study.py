"""core.studies.membership as a job on the tiny pipeline and real LFW people: events, Done(MembershipResult),
a stop that ends it at once, and the command's reports."""

import json

import pytest

from core.events import Done, Message, Progress
from core.studies import membership as sm

CFG = sm.MembershipStudyConfig(n=2, n_calibration=2, steps=2, timesteps=(200, 400), noises=1, max_unseen=1, n_others=1)
FLAGS = ["--n", "2", "--n-calibration", "2", "--steps", "2", "--timesteps", "200", "400", "--noises", "1"]


@pytest.fixture(scope="module")
def events(tiny_pipe, lfw_root):
    return list(sm.run_study(tiny_pipe, CFG))


def test_the_study_is_a_job_of_events_ending_in_its_result(events):
    assert all(isinstance(ev, (Progress, Message, Done)) for ev in events)
    assert [ev for ev in events if isinstance(ev, Done)] == [events[-1]]
    res = events[-1].result
    assert isinstance(res, sm.MembershipResult) and not events[-1].cancelled
    assert res.steps == [2] and set(res.rows) == {"2"} and res.n_with_unseen == 2
    assert not set(res.victims) & set(res.calibration_people)  # victims are never calibration people
    stages = [ev.stage for ev in events if isinstance(ev, Progress)]
    assert {"tuning LoRAs", "scoring calibration LoRAs", "victims LoRAs", "scoring victims' LoRAs"} <= set(stages)
    scored = [ev.step for ev in events if isinstance(ev, Progress) and ev.stage == "scoring victims' LoRAs"]
    assert scored == list(range(1, len(res.victims) + 1))
    assert any(isinstance(ev, Message) and ev.text.startswith("threshold") for ev in events)


def test_a_stop_after_the_first_progress_ends_the_job(tiny_pipe, events, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("scored after the stop")

    seen = []
    for ev in sm.run_study(tiny_pipe, CFG, should_stop=lambda: any(isinstance(e, Progress) for e in seen)):
        seen.append(ev)
        if isinstance(ev, Progress):  # from here on nothing more may be measured
            monkeypatch.setattr(sm, "photo_losses", boom)
    assert sum(isinstance(ev, Progress) for ev in seen) == 1
    assert seen[-1] == Done(None, cancelled=True)


def test_the_command_runs_the_job_and_writes_the_reports(tiny_pipe, tiny_pipeline_dir, events, tmp_path, capsys):
    sm.main(["--model", str(tiny_pipeline_dir), *FLAGS, "--max-unseen", "1", "--n-others", "1", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "membership.json").read_text())
    res = events[-1].result
    as_json = lambda x: json.loads(json.dumps(x))
    assert r["rows"] == as_json(res.rows) and r["calibration"] == as_json(res.calibration)  # same numbers
    assert r["command"].startswith("python -m core.studies.membership")
    assert (tmp_path / "membership.md").read_text() == sm.to_markdown(r)
    assert json.loads((tmp_path / "membership_chart.json").read_text())["data"]
    assert "scoring victims' LoRAs" in capsys.readouterr().err  # the progress bar, on stderr
