"""core.studies.base on the tiny pipeline: every model gets its rows, real-vs-real references are
given per source, and the study can be cancelled."""

import json

from core.events import Done
from core.studies.base import BaseStudyConfig, main, run, template_for


def test_report_has_rows_per_model_and_references(tiny_pipeline_dir, tmp_path):
    main(
        [
            "--model",
            str(tiny_pipeline_dir),
            "--compare",
            str(tiny_pipeline_dir),
            "--n",
            "8",
            "--steps",
            "2",
            "--utkface",
            "none",
            "--out",
            str(tmp_path),
        ]
    )
    doc = json.loads((tmp_path / "eval_base.json").read_text())
    assert len(doc["models"]) == 2 and doc["command"].startswith("python -m core.studies.base")
    r = doc["models"][0]
    assert set(r["frechet"]) == set(r["real"]) == {"LFW"}
    assert r["real"]["LFW"]["n_a"] == r["real"]["LFW"]["n_b"] == 8 and r["frechet"]["LFW"] > 0
    assert (tmp_path / "base_samples.png").exists() and "real vs real" in (tmp_path / "eval_base.md").read_text()


def test_cancel_stops_between_batches(tiny_pipeline_dir):
    calls = []
    events = list(
        run(
            [str(tiny_pipeline_dir)],
            BaseStudyConfig(n=40, steps=1, utkface="none"),
            should_stop=lambda: calls.append(1) or len(calls) > 1,
        )
    )
    assert isinstance(events[-1], Done) and events[-1].cancelled


def test_template_zoom_round_trip():
    import numpy as np

    from core.faces import ingest

    assert np.allclose(template_for(ingest.TEMPLATE_ZOOM), ingest.load_template(), atol=1e-2)
    wide = template_for(1.0)
    assert np.ptp(wide[:, 0]) < np.ptp(ingest.load_template()[:, 0])  # a smaller face in the crop
