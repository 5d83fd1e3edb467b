"""A tab that quotes a study says so when the study measured another base model than the app runs."""

import json

from core.studies import measured_elsewhere


def test_measured_elsewhere_names_both_models_or_says_nothing():
    note = measured_elsewhere({"base": "aaaa"}, "bbbb", "python -m core.studies.attack --n 50")
    assert "`aaaa`" in note and "`bbbb`" in note and "python -m core.studies.attack --n 50" in note
    assert measured_elsewhere({"base": "bbbb"}, "bbbb", "x") == ""
    assert measured_elsewhere(None, "bbbb", "x") == "" and measured_elsewhere({"base": "a"}, None, "x") == ""
    assert "does not record which" in measured_elsewhere({"rows": []}, "bbbb", "x")


def test_every_quoting_tab_carries_the_note():
    from core import RESULTS
    from ui import attack_tab, layers_tab, watermark_tab

    for tab, name in ((attack_tab, "attack.json"), (layers_tab, "layers.json"), (watermark_tab, "watermark.json")):
        r = {**json.loads((RESULTS / name).read_text()), "base": "old"}
        assert "Measured on base model `old`" in tab.measured_text(r, base="new"), name
        assert "Measured on base model" not in tab.measured_text(r, base="old"), name


def test_defenses_tab_heads_carry_the_note(tmp_path):
    from core import RESULTS
    from ui.defenses_tab import cloaking_view, defenses_view

    for view, name in ((defenses_view, "defenses.json"), (cloaking_view, "cloaking.json")):
        r = json.loads((RESULTS / name).read_text())
        p = tmp_path / name
        p.write_text(json.dumps({**r, "base": "old"}))
        assert "Measured on base model `old`" in view(p, "new")[0]
        assert "Measured on base model" not in view(p, "old")[0]
