"""The privacy-utility study's loop (tiny pipeline, an untrained attacker, 2 fake victims) and the
defenses in the app: the Fine-tune tab's post-hoc defense and DP-SGD switch, the Defenses tab."""

import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from core.events import drain, result_of
from core.finetune.lora import FinetuneConfig, finetune, load_lora
from tests.conftest import random_crops

TINY = FinetuneConfig(steps=2, checkpoint_every=0, preview_n=0, n_class=4, batch=2)
POINTS = [("prune", 0.9), ("quantize", 3)]


def photos(seed0, n=4, size=64):
    return [np.random.default_rng(seed0 + i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(n)]


def factor_keys(sd):
    return [k for k in sd if k.endswith((".lora_A.weight", ".lora_B.weight"))]


@pytest.fixture(scope="module")
def victims(tiny_pipe):
    from core.studies.defenses import Victims

    private, loras, triggers, seeds = [], [], [], [11, 12]
    for i, seed in enumerate(seeds):
        crops = photos(100 * (i + 1))
        res = drain(finetune(tiny_pipe, crops, replace(TINY, seed=seed)))
        private.append(crops)
        loras.append(res.lora)
        triggers.append(res.trigger)
    return Victims(["fake_a", "fake_b"], private, loras, triggers, seeds)


@pytest.fixture(scope="module")
def attacker(tiny_pipe, victims, tmp_path_factory):
    """An untrained attacker for the tiny base, saved and loaded like the shipped asset: (path, model)."""
    from core.attack.attacker import Attacker, config_for, load_attacker, save_attacker
    from core.finetune.lora import encode_prompt
    from core.model.prompts import CLASS_PROMPT

    cfg = config_for(tiny_pipe, victims.loras[0], rank=TINY.rank, alpha=TINY.alpha)
    model = Attacker(cfg, class_embedding=encode_prompt(tiny_pipe, CLASS_PROMPT)[0])
    path = save_attacker(model, tmp_path_factory.mktemp("attacker") / "attacker.safetensors")
    return path, load_attacker(path)[0]


@pytest.fixture(scope="module")
def study(tiny_pipe, victims, attacker, monkeypatch_module):
    """The study's rows, and every LoRA it scored (per row, in order)."""
    import core.studies.defenses as ed

    scored = []
    real = ed.score_lora
    monkeypatch_module.setattr(
        ed, "score_lora", lambda pipe, att, lora, *a: (scored.append(lora), real(pipe, att, lora, *a))[1]
    )
    r = asdict(drain(ed.run_study(tiny_pipe, attacker[1], victims, TINY, points=POINTS, dp_noise=(1.0,))))
    monkeypatch_module.setattr(ed, "score_lora", real)
    return r, scored


def test_study_rows_have_every_field(study, victims):
    from core.defenses.dp import epsilon_curve

    r, _ = study
    assert r["n"] == 2 and r["chance_top1"] == 0.5
    assert [(x["defense"], x["strength"]) for x in r["rows"]] == [
        ("none", None),
        *POINTS,
        ("dp_sgd", 1.0),
        ("floor", None),
    ]
    for row in r["rows"]:
        assert {
            "label",
            "short",
            "title",
            "attack",
            "attack_gain",
            "attack_at_floor",
            "utility",
            "utility_gain",
            "utility_at_floor",
            "seconds",
        } <= set(row)
        assert {"distance", "distance_ci", "top1", "top5", "within_0_6", "per_victim_distance"} <= set(row["attack"])
        assert {"distance", "distance_ci", "beats_floor", "same_person", "per_victim_distance"} <= set(row["utility"])
        assert len(row["attack"]["per_victim_distance"]) == len(row["utility"]["per_victim_distance"]) == 2
        assert 0 <= row["attack"]["top1"] <= row["attack"]["top5"] <= 1
    dp = r["rows"][3]
    assert dp["epsilon"] == pytest.approx(epsilon_curve(1.0, TINY.batch / 4, TINY.steps, 1e-5)[-1])
    assert dp["photos_per_victim"] == 4 and dp["noise_multiplier"] == 1.0
    floor = r["rows"][-1]
    assert floor["attack"]["per_victim_distance"] == floor["utility"]["per_victim_distance"]
    assert floor["attack_gain"]["mean"] == 0 and floor["attack_at_floor"]
    json.dumps(r, allow_nan=False)  # the report is plain JSON


def test_undefended_row_is_the_plain_attack_and_defended_rows_score_defended_loras(study, victims, tiny_pipe, attacker):
    """The undefended point is eval_attack's attack on the LoRA as it is; each other post-hoc point
    scored exactly the defense of that LoRA."""
    from core.attack.attacker import reconstruct
    from core.defenses.posthoc import apply_defense
    from core.faces.utility import describe_set, lora_utility
    from core.finetune.lora import pipeline_with_lora
    from core.studies.attack import summarize

    r, scored = study
    n = len(victims.names)
    gallery = np.stack([describe_set(p) for p in victims.private])
    desc = np.stack(
        [
            describe_set(
                reconstruct(tiny_pipe, attacker[1], lo, TINY.steps, model=pipeline_with_lora(tiny_pipe, lo))[0]
            )
            for lo in victims.loras
        ]
    )
    want = summarize(desc, gallery)
    und = r["rows"][0]
    assert und["attack"]["per_victim_distance"] == want["per_victim_distance"]
    assert und["attack"]["top1"] == want["top1"] and und["attack"]["distance"] == pytest.approx(want["distance"])
    util = [
        lora_utility(tiny_pipe, lo, t, p).distance for lo, t, p in zip(victims.loras, victims.triggers, victims.private)
    ]
    assert und["utility"]["distance"] == pytest.approx(np.mean(util))
    assert len(scored) == n * (len(r["rows"]) - 1)  # every row but the floor scores one LoRA per victim
    for j, (name, s) in enumerate(POINTS, 1):
        for i in range(n):
            got, want_lora = scored[j * n + i], apply_defense(victims.loras[i], name, s)
            assert all(torch.equal(got[k], want_lora[k]) for k in want_lora)
    pruned = scored[n]
    for k in factor_keys(pruned):
        assert int((pruned[k] == 0).sum()) >= round(0.9 * pruned[k].numel())


def test_a_rerun_scores_only_new_points(study, victims, tiny_pipe, attacker, monkeypatch):
    """Every point is cached by what it scored: the same study again scores nothing and gives the same
    rows; one new point is the only thing scored."""
    import core.studies.defenses as ed

    r, _ = study
    scored = []
    real = ed.score_lora
    monkeypatch.setattr(
        ed, "score_lora", lambda pipe, att, lora, *a: (scored.append(lora), real(pipe, att, lora, *a))[1]
    )
    again = asdict(drain(ed.run_study(tiny_pipe, attacker[1], victims, TINY, points=POINTS, dp_noise=(1.0,))))
    assert scored == []
    strip = lambda rows: [{k: v for k, v in x.items() if k != "seconds"} for x in rows]  # noqa: E731
    assert strip(again["rows"]) == strip(r["rows"])
    more = asdict(
        drain(ed.run_study(tiny_pipe, attacker[1], victims, TINY, points=POINTS + [("prune", 0.5)], dp_noise=(1.0,)))
    )
    assert len(scored) == len(victims.names) and len(more["rows"]) == len(r["rows"]) + 1


def test_study_reports_each_point_and_stops_when_asked(study, victims, tiny_pipe, attacker):
    """A Progress per point; a stop ends the study after the points measured, with the floor row."""
    import core.studies.defenses as ed
    from core.events import Done, Progress

    calls = []
    events = list(
        ed.run_study(
            tiny_pipe,
            attacker[1],
            victims,
            TINY,
            points=POINTS,
            dp_noise=(),
            should_stop=lambda: calls.append(1) or len(calls) > 2,
        )
    )
    assert [(e.step, e.total) for e in events if isinstance(e, Progress)] == [(1, 3), (2, 3)]
    done = events[-1]
    assert isinstance(done, Done) and done.cancelled
    assert [x["defense"] for x in done.result.rows] == ["none", POINTS[0][0], "floor"]


def test_dp_loras_are_cached(tiny_pipe, victims):
    from core.defenses.dp import DPConfig
    from core.studies.defenses import dp_victim_lora

    args = (tiny_pipe, victims.private[0], victims.names[0], victims.seeds[0], TINY, DPConfig(noise_multiplier=1.0))
    first, again = result_of(dp_victim_lora(*args)), result_of(dp_victim_lora(*args))
    assert first["epsilon"] == again["epsilon"] and first["trigger"] == again["trigger"]
    assert all(torch.equal(first["lora"][k], again["lora"][k]) for k in first["lora"])


def test_reports_conclusion_and_chart_come_from_the_rows(study):
    import plotly.graph_objects as go

    from core.plots import privacy_utility_plot
    from core.studies.defenses import conclusion, to_markdown

    r = dict(study[0], command="python -m core.studies.defenses --n 2", created="2025-01-01T00:00:00+00:00")
    text = conclusion(r)
    und = r["rows"][0]
    assert f"{und['attack']['distance']:.3f}" in text and f"{r['rows'][-1]['attack']['distance']:.3f}" in text
    for title in ("Pruning", "Quantization", "DP-SGD fine-tune"):
        assert title in text
    md = to_markdown(dict(r, conclusion=text))
    assert "python -m core.studies.defenses --n 2" in md and md.count("\n| ") == len(r["rows"]) + 1
    fig = privacy_utility_plot(r["rows"])
    assert isinstance(fig, go.Figure)
    names = [t.name for t in fig.data]
    assert {"pruning", "quantization", "DP-SGD fine-tune", "undefended LoRA"} <= set(names)
    line = next(t for t in fig.data if t.name == "pruning")
    assert list(line.x) == [und["utility"]["distance"], r["rows"][1]["utility"]["distance"]]
    assert json.loads(fig.to_json())["data"]


def test_study_command_fails_clearly_without_the_attacker(tmp_path):
    from core.studies.defenses import main

    with pytest.raises(SystemExit) as e:
        main(["--attacker", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)])
    assert "No trained attacker at" in str(e.value) and "core.attack.train" in str(e.value)
    assert not list(tmp_path.iterdir())


def test_defenses_tab_shows_the_study_or_says_it_was_not_run(study, tmp_path):
    import plotly.graph_objects as go

    from ui.defenses_tab import defenses_view

    head, fig, table = defenses_view(tmp_path / "defenses.json")
    assert "has not been run yet" in head and "python -m core.studies.defenses" in head
    assert fig is None and table == ""
    r = dict(
        study[0],
        command="python -m core.studies.defenses --n 2",
        created="2025-01-01T00:00:00+00:00",
        conclusion="CONCLUSION TEXT",
    )
    (tmp_path / "defenses.json").write_text(json.dumps(r))
    head, fig, table = defenses_view(tmp_path / "defenses.json")
    assert "`python -m core.studies.defenses --n 2`" in head and "2025-01-01" in head and "2 people" in head
    assert isinstance(fig, go.Figure) and "| pruning | 90 % zeroed |" in table and "CONCLUSION TEXT" in table


# the Fine-tune tab's defenses ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engine(tiny_pipe, tiny_pipeline_dir, attacker):
    from core.engine import Engine

    engine = Engine(str(tiny_pipeline_dir), "cpu", attacker=str(attacker[0]))
    assert engine.attacker()[0] is not None
    return engine


def test_finetune_tab_applies_the_posthoc_defense(tiny_engine, monkeypatch):
    import core.defenses.posthoc as posthoc
    import ui.finetune_tab as ft
    from core.defenses.posthoc import prune
    from core.faces.utility import EVAL_SEEDS
    from ui.session import VisitorSession

    seen = []
    real = posthoc.apply_defense
    monkeypatch.setattr(
        posthoc, "apply_defense", lambda lora, name, s: (seen.append((lora, name, s)), real(lora, name, s))[1]
    )
    session = VisitorSession(crops=random_crops(3))
    try:
        updates = list(ft.train_run(tiny_engine, session, 4, 4, 3e-3, 0, False, defense="prune", strength=0.9))
        assert all(set(u) <= set(ft.FINETUNE_OUTPUTS) for u in updates)
        final = [x for x in seen if x[0]][-1]  # the fine-tune's own final LoRA, defended for export
        assert final[1:] == ("prune", 0.9)
        raw = final[0]
        downloaded, _ = load_lora(updates[-1]["download"])
        want = prune(raw, 0.9)
        assert set(downloaded) == set(want)
        for k in factor_keys(want):
            assert torch.allclose(downloaded[k], want[k])
            assert int((downloaded[k] == 0).sum()) >= round(0.9 * downloaded[k].numel())
            assert int((raw[k] == 0).sum()) < round(0.9 * raw[k].numel())  # the undefended one was not sparse
        assert all(torch.equal(session.result.lora[k], want[k]) for k in want)  # the other tabs see the shared LoRA
        # defended once: the final checkpoint the attacker read at step 4 is the LoRA exported
        assert len([x for x in seen if x[0]]) == 1
        recon = [u["attack_gallery"] for u in updates if isinstance(u.get("attack_gallery"), list)][-1]
        assert [c for _, c in recon] == ["step 4", "step 4"]
        assert any("(pruning (90 % of the weights set to zero)), step 4" in u.get("attack_head", "") for u in updates)
        previews = [u["previews"] for u in updates if u.get("previews")][-1]
        # the last step's previews are the utility protocol's own samples (drawn once, shown and scored)
        assert len(previews) == len(EVAL_SEEDS)
        assert {c for _, c in previews} == {"step 4 (pruning (90 % of the weights set to zero))"}
        assert "pruning (90 % of the weights set to zero)" in updates[-1]["status"]
        assert "after pruning" in updates[-1]["score"] and "before the defense" in updates[-1]["score"]
    finally:
        session.close()


def test_finetune_tab_with_dp_shows_the_accountants_epsilon(tiny_engine):
    import gradio as gr

    from core.defenses.dp import epsilon_curve
    from ui.finetune_tab import defense_slider, train_run
    from ui.session import VisitorSession

    session = VisitorSession(crops=random_crops(3))
    try:
        with pytest.raises(gr.Error):
            next(train_run(tiny_engine, session, 4, 4, 3e-3, 0, True, dp=True))  # DP trains the UNet only
        updates = list(train_run(tiny_engine, session, 4, 4, 3e-3, 0, False, dp=True, dp_noise=2.0))
        eps = epsilon_curve(2.0, 2 / 3, 4, 1e-5)[-1]
        assert math.isfinite(eps)
        words = f"epsilon **{eps:.3g}** per photo"
        training = [u["status"] for u in updates if u.get("status", "").startswith("Training step **4/4**")]
        assert training and words in training[0] and "5 photos has roughly 5x that" in training[0]
        assert words in updates[-1]["status"] and "noise multiplier 2" in updates[-1]["status"]
        assert session.result.epsilon == pytest.approx(eps) and load_lora(updates[-1]["download"])[0]
    finally:
        session.close()
    assert defense_slider("quantize").maximum == 16 and defense_slider("none").visible is False
