"""The cloaking study's loop (tiny pipeline, an untrained attacker, 2 fake victims): every row, the
LoRAs trained on the right photos, results cached, the report read off the numbers."""

import json
from dataclasses import asdict, replace

import numpy as np
import pytest

from core.events import drain, result_of
from core.studies import cloaking as cs
from tests.test_cloak import face_like

CFG = cs.CloakingStudyConfig(n=2, budgets=(4.0, 12.0), cloak_steps=3, steps=2)


@pytest.fixture(scope="module")
def victims(tiny_pipe):
    private = [face_like(3, 64)[:3], [np.ascontiguousarray(np.flip(p, 0)) for p in face_like(3, 64)]]
    seeds = [11, 12]
    clean = result_of(cs.variant_loras(tiny_pipe, ["fake_a", "fake_b"], private, seeds, CFG.recipe()))
    return cs.Victims(["fake_a", "fake_b"], private, seeds, clean)


@pytest.fixture(scope="module")
def attacker(tiny_pipe, victims):
    from core.attack.attacker import Attacker, config_for
    from core.finetune.lora import encode_prompt
    from core.model.prompts import CLASS_PROMPT

    cfg = config_for(tiny_pipe, victims.clean[0]["lora"], rank=4, alpha=4.0)
    return Attacker(cfg, class_embedding=encode_prompt(tiny_pipe, CLASS_PROMPT)[0]).eval()


@pytest.fixture(scope="module")
def study(tiny_pipe, victims, attacker):
    return asdict(drain(cs.run_study(tiny_pipe, attacker, victims, CFG)))


def test_every_row_is_there_with_its_fields(study):
    kinds = [(x["kind"], x["budget"]) for x in study["rows"]]
    assert kinds == [
        ("clean", None),
        ("purified", None),
        ("cloaked", 4.0),
        ("cloaked+purified", 4.0),
        ("cloaked", 12.0),
        ("cloaked+purified", 12.0),
        ("floor", None),
    ]
    for x in study["rows"]:
        assert len(x["utility"]["per_victim_distance"]) == 2 and len(x["attack"]["per_victim_distance"]) == 2
        assert {"utility_gain", "utility_at_floor", "attack_gain", "attack_at_floor", "label"} <= set(x)
        if x["kind"] not in ("clean", "floor"):
            assert x["utility_vs_clean"]["ci"][0] <= x["utility_vs_clean"]["mean"] <= x["utility_vs_clean"]["ci"][1]
            assert "attack_vs_clean" in x and x["psnr"]["mean"] > 20 and 0 < x["ssim"]["mean"] < 1
    cloaked = [x for x in study["rows"] if x["kind"] == "cloaked"]
    assert cloaked[0]["psnr"]["mean"] > cloaked[1]["psnr"]["mean"]  # a larger budget is more visible
    assert cloaked[1]["loss_gain"]["mean"] > 1  # the larger cloak raised its surrogate's loss
    assert study["rows"][0]["psnr"] is None and study["rows"][-1]["utility_gain"]["mean"] == 0
    json.dumps(study, allow_nan=False)


def test_the_protected_loras_trained_on_the_protected_photos(tiny_pipe, victims):
    from core.defenses.purify import purify

    variants = result_of(cs.build_variants(tiny_pipe, victims.private, CFG))
    cloaked = next(v for v in variants if v.kind == "cloaked" and v.budget == 12.0)
    both = next(v for v in variants if v.kind == "cloaked+purified" and v.budget == 12.0)
    for ps, os_ in zip(cloaked.photos, victims.private):
        moved = [np.abs(p.astype(int) - o.astype(int)).max() for p, o in zip(ps, os_)]
        assert 1 <= max(moved) <= 12
    assert all(
        np.array_equal(a, b)
        for ps, qs in zip(both.photos, cloaked.photos)
        for a, b in zip(ps, purify(qs, CFG.purify_config()))
    )
    # the LoRA of a cloaked set is the one the recipe makes on those photos (same seed as the clean one)
    from core.attack.shadow import train_many

    got = result_of(
        cs.variant_loras(tiny_pipe, victims.names[:1], cloaked.photos[:1], victims.seeds[:1], CFG.recipe())
    )[0]
    want = drain(train_many(tiny_pipe, cloaked.photos[:1], CFG.recipe(), seeds=victims.seeds[:1]))
    assert got["trigger"] == want["triggers"][0] == victims.clean[0]["trigger"]
    w = want["trajectory"][CFG.steps][0]
    diff = lambda a: max(float((a[k] - w[k]).abs().max()) for k in w)
    # trained in a group of 10, it matches up to float rounding (as tests/test_shadow.py); the clean LoRA does not
    assert diff(got["lora"]) < 1e-4 < diff(victims.clean[0]["lora"])


def test_a_rerun_measures_nothing_again(tiny_pipe, victims, attacker, study, monkeypatch):
    import core.attack.shadow
    import core.defenses.cloak

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(cs, "lora_utility", boom)
    monkeypatch.setattr(cs, "cloak_photos", boom)
    monkeypatch.setattr(core.attack.shadow, "train_many", boom)
    again = asdict(drain(cs.run_study(tiny_pipe, attacker, victims, CFG)))
    assert again["rows"] == study["rows"]


def test_without_an_attacker_the_study_measures_utility_only(tiny_pipe, victims):
    r = asdict(drain(cs.run_study(tiny_pipe, None, victims, replace(CFG, budgets=(4.0,)))))
    assert not r["attack_measured"] and all(x["attack"] is None for x in r["rows"])
    r = dict(r, base="tiny")
    assert "not measured" in cs.table_markdown(r) and "the attack was not measured" in cs.conclusion(r)


def test_the_report_reads_off_the_numbers(study):
    from core.plots import cloaking_plot

    r = dict(study, base="tiny")
    text = cs.conclusion(r)
    clean = r["rows"][0]
    assert f"{clean['utility']['distance']:.3f}" in text and "Against the papers" in text and "12/255" in text
    md = cs.to_markdown(r)
    assert md.count("\n| ") == len(r["rows"]) + 1 and "**Conclusion.**" in md
    fig = cloaking_plot(r)
    assert len(fig.data) == 4  # LoRA and attack, each on cloaked and on cloaked-then-purified photos


def test_config_is_validated_with_the_value():
    for kw, text in [
        (dict(n=1), "1"),
        (dict(budgets=(0.0,)), "0.0"),
        (dict(surrogate="x"), "'x'"),
        (dict(purify=("zip",)), "zip"),
        (dict(budgets=()), "budgets"),
    ]:
        with pytest.raises(ValueError, match=text):
            cs.CloakingStudyConfig(**kw)


# the study as a job ---------------------------------------------------------------------------------


def _drain_until_stopped(job_of, stop_after):
    """Events of ``job_of(should_stop)``, whose should_stop turns true once ``stop_after(events)`` does."""
    events = []
    for ev in job_of(lambda: stop_after(events)):
        events.append(ev)
    return events


def test_the_study_is_a_job_of_events_ending_in_its_result(tiny_pipe, victims, attacker, study):
    from core.events import Done, Message, Progress

    events = list(cs.run_study(tiny_pipe, attacker, victims, CFG))
    assert all(isinstance(ev, (Progress, Message, Done)) for ev in events)
    assert [ev for ev in events if isinstance(ev, Done)] == [events[-1]]
    assert isinstance(events[-1].result, cs.CloakingResult) and not events[-1].cancelled
    assert asdict(events[-1].result)["rows"] == study["rows"]  # a cached rerun, the same rows
    rows = [ev for ev in events if isinstance(ev, Progress) and ev.stage == "cloaking rows"]
    assert [ev.step for ev in rows] == list(range(1, 7)) and all(ev.total == 6 for ev in rows)
    assert sum(isinstance(ev, Progress) and ev.stage == "cloaked photo sets" for ev in events) == 2 * 2
    assert any(isinstance(ev, Message) and ev.text.startswith("clean photos") for ev in events)


def test_a_stop_after_the_first_cloak_ends_the_job_before_any_lora(tiny_pipe, victims, attacker, monkeypatch):
    import core.attack.shadow
    from core.events import Done, Progress

    def boom(*a, **k):
        raise AssertionError("trained a LoRA after the stop")

    monkeypatch.setattr(core.attack.shadow, "train_many", boom)
    cfg = replace(CFG, budgets=(6.0,))  # a budget not cloaked yet: the first cloak is computed
    events = _drain_until_stopped(
        lambda stop: cs.run_study(tiny_pipe, attacker, victims, cfg, should_stop=stop),
        lambda evs: any(isinstance(ev, Progress) for ev in evs),
    )
    assert sum(isinstance(ev, Progress) for ev in events) == 1
    assert events[-1] == Done(None, cancelled=True)


def test_a_stop_while_scoring_keeps_the_rows_measured(tiny_pipe, victims, attacker, study):
    from core.events import Done, Progress

    events = _drain_until_stopped(
        lambda stop: cs.run_study(tiny_pipe, attacker, victims, CFG, should_stop=stop),
        lambda evs: any(isinstance(ev, Progress) and ev.stage == "cloaking rows" for ev in evs),
    )
    last = events[-1]
    assert isinstance(last, Done) and last.cancelled and isinstance(last.result, cs.CloakingResult)
    assert [x["kind"] for x in last.result.rows] == ["clean", "floor"]
    assert last.result.rows[0] == study["rows"][0]


def test_the_command_runs_the_job_and_writes_the_reports(tiny_pipe, tiny_pipeline_dir, lfw_root, tmp_path, capsys):
    argv = ["--model", str(tiny_pipeline_dir), "--n", "2", "--budgets", "4", "--cloak-steps", "2"]
    cs.main([*argv, "--steps", "2", "--attack", "False", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "cloaking.json").read_text())
    assert [x["kind"] for x in r["rows"]] == ["clean", "purified", "cloaked", "cloaked+purified", "floor"]
    assert r["n"] == 2 and not r["attack_measured"] and r["command"].startswith("python -m core.studies.cloaking")
    assert (tmp_path / "cloaking.md").read_text() == cs.to_markdown(r)
    assert json.loads((tmp_path / "cloaking_chart.json").read_text())["data"]
    assert "cloaking rows" in capsys.readouterr().err  # the progress bar, on stderr
