"""core.studies.layers: selection orders, per-LoRA rows on the tiny pipeline, and the summary arithmetic."""

from core.faces.utility import floor_images
from core.layers.change import LayerChange, lora_layer_change
from core.studies.layers import ORDERS, lora_rows, orders, summarize, to_markdown
from tests.conftest import random_crops
from tests.test_layers import run  # noqa: F401 - the tiny fine-tune fixture


def change(name, rel):
    return LayerChange(name, "mid_block", "conv", rel, 0.5, rel, 1.0, 10)


def test_orders_are_the_ranking_its_reverse_and_a_seeded_permutation():
    cs = [change(f"l{i}", r) for i, r in enumerate([0.3, 0.9, 0.1, 0.5])]
    o = orders(cs, seed=0)
    assert [c.name for c in o["busiest"]] == ["l1", "l3", "l0", "l2"]
    assert o["laziest"] == o["busiest"][::-1]
    assert (
        sorted(c.name for c in o["random"]) == sorted(c.name for c in cs)
        and o["random"] == orders(cs, seed=0)["random"]
    )


def test_lora_rows_on_the_tiny_pipeline(tiny_pipe, run):  # noqa: F811
    res, _ = run
    photos = random_crops(3)
    floor = floor_images(tiny_pipe, steps=2)
    n = len(lora_layer_change(tiny_pipe, res.lora))
    rows = lora_rows(tiny_pipe, res.lora, res.trigger, photos, [1, n], floor, seed=0)
    assert rows["layers"] == n and set(ORDERS) <= set(rows)
    for name in ORDERS:  # every order keeps every layer at k = n: the whole LoRA
        assert abs(rows[name][n] - rows["all"]) < 1e-6
    assert abs(rows["concentration"][n] - 1.0) < 1e-9 and 0 < rows["concentration"][1] <= 1


def test_summary_kept_share_and_markdown():
    ks = [1, 2]
    per = [
        {
            "layers": 4,
            "all": 0.4,
            "concentration": {1: 0.6, 2: 0.8},
            "busiest": {1: 0.45, 2: 0.42},
            "laziest": {1: 0.5, 2: 0.5},
            "random": {1: 0.48, 2: 0.46},
        }
    ] * 3
    s = summarize(per, [0.5, 0.5, 0.5], ks)
    assert abs(s["busiest"]["1"]["kept"] - 0.5) < 1e-9 and abs(s["laziest"]["2"]["kept"]) < 1e-9
    md = to_markdown(
        {"created": "now", "command": "python -m core.studies.layers", "complete": True, "lora": s, "full": None}
    )
    assert "| 1 | 60% | 0.450 (50%) | 0.500 (0%) | 0.480 (20%) |" in md


def test_layers_tab_quotes_the_study_or_says_it_was_not_run():
    from ui.layers_tab import measured_text

    per = [
        {
            "layers": 4,
            "all": 0.4,
            "concentration": {1: 0.6, 2: 0.8},
            "busiest": {1: 0.47, 2: 0.42},
            "laziest": {1: 0.5, 2: 0.5},
            "random": {1: 0.48, 2: 0.46},
        }
    ] * 3
    s = summarize(per, [0.5] * 3, [1, 2])
    text = measured_text({"lora": s})
    assert "**2 busiest** of a LoRA's 4 layers keeps **80%**" in text and "2 laziest keep 0%" in text
    assert "Not measured" in measured_text({})


def test_study_job_saves_after_each_victim_in_the_reports_format(tiny_pipe, tiny_pipeline_dir, lfw_root):
    import json

    from core import RESULTS
    from core.events import Done, Progress
    from core.studies.layers import LayersStudyConfig, report
    from core.studies.layers import run as run_study

    saved = []
    cfg = LayersStudyConfig(n=2, full_n=1, full_steps=2, ks=(1,), full_ks=(1,))
    events = list(
        run_study(
            cfg,
            str(tiny_pipeline_dir),
            save=lambda res: saved.append((len(res.per_lora), len(res.per_full), res.complete)),
        )
    )
    assert saved == [(1, 0, False), (2, 0, False), (2, 1, False), (2, 1, True)]
    assert [(e.stage, e.step, e.total) for e in events if isinstance(e, Progress) and "LoRAs" not in e.stage] == [
        ("LoRA victims", 1, 2),
        ("LoRA victims", 2, 2),
        ("full fine-tunes", 1, 1),
    ]
    done = events[-1]
    assert isinstance(done, Done) and not done.cancelled
    r = report(done.result, "python -m core.studies.layers --n 2", "now", 0.1)
    if (RESULTS / "layers.json").exists():
        assert list(r) == list(json.loads((RESULTS / "layers.json").read_text()))
    assert r["complete"] and r["lora"]["n"] == 2 and r["full"]["n"] == 1
    # a conclusion wherever a share of the gain was measured (the tiny random model may gain nothing
    # over its floor, and then there is no share to quote)
    measured = any(v["kept"] is not None for part in ("lora", "full") for v in r[part]["busiest"].values())
    assert isinstance(r["conclusion"], str) and bool(r["conclusion"]) == measured
    json.dumps(r)


def test_study_job_stops_between_victims(tiny_pipe, tiny_pipeline_dir, lfw_root):
    from core.events import Done
    from core.studies.layers import LayersStudyConfig
    from core.studies.layers import run as run_study

    saved = []
    events = list(
        run_study(
            LayersStudyConfig(n=2, full_n=0, ks=(1,)),
            str(tiny_pipeline_dir),
            save=saved.append,
            should_stop=lambda: len(saved) >= 1,
        )
    )
    done = events[-1]
    assert isinstance(done, Done) and done.cancelled and len(done.result.per_lora) == 1 and not done.result.complete
    assert len(saved) == 1
