"""The app's side of photo protection and membership inference (ui.protect_panel, ui.membership_panel,
the cloaking part of ui.defenses_tab), on the tiny engine: what the Train button's job gets back, what
the visitor reads."""

import json
from dataclasses import asdict
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from core import ASSETS

EXAMPLES = sorted((ASSETS / "examples" / "person_1000").glob("*.png"))


def run_to_end(gen):
    """(the updates a generator yielded, the value it returned)."""
    updates = []
    while True:
        try:
            updates.append(next(gen))
        except StopIteration as stop:
            return updates, stop.value


@pytest.fixture(scope="module")
def crops(tiny_engine):
    from core.faces.ingest import ingest_face

    return [ingest_face(p.read_bytes(), size=tiny_engine.image_size).crop for p in EXAMPLES[:3]]


def test_protect_off_trains_on_the_originals(tiny_engine, crops):
    from ui.protect_panel import protect_updates

    updates, photos = run_to_end(protect_updates(tiny_engine, crops, False, 8, False))
    assert all(np.array_equal(a, b) for a, b in zip(photos, crops)) and len(photos) == len(crops)
    assert updates and all("status" not in u for u in updates)


@pytest.mark.parametrize("purify", [False, True])
def test_protect_on_returns_cloaked_photos_and_shows_them_beside_the_originals(tiny_engine, crops, purify):
    from ui.protect_panel import protect_updates

    updates, photos = run_to_end(protect_updates(tiny_engine, crops, True, 6, purify))
    assert len(photos) == len(crops) and any(not np.array_equal(a, b) for a, b in zip(photos, crops))
    if not purify:
        assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 6 for a, b in zip(photos, crops))
    assert any("step" in u.get("status", "") for u in updates)
    last = [u for u in updates if "protect_gallery" in u][-1]["protect_gallery"]
    items = last["value"]  # a gr.update: ui.session.media makes its images files in the session dir
    assert len(items) == 2 * len(crops)
    captions = [c for _, c in items]
    assert captions[0] == "photo 1: original" and "PSNR" in captions[1] and ("purified" in captions[1]) == purify
    done = [u["status"] for u in updates if "status" in u][-1]
    assert "Cloaked 3 photos" in done and "PSNR" in done and (("purified as an attacker would" in done) == purify)


def test_protect_stops_when_asked_and_refuses_a_bad_budget(tiny_engine, crops):
    from ui.protect_panel import protect_updates

    updates, photos = run_to_end(protect_updates(tiny_engine, crops, True, 8, False, should_stop=lambda: True))
    assert photos is None and "nothing was fine-tuned" in updates[-1]["status"]
    with pytest.raises(gr.Error, match="budget"):
        run_to_end(protect_updates(tiny_engine, crops, True, 500, False))


def test_cloak_preview_uses_the_sessions_photos(tiny_engine, crops):
    from ui.protect_panel import cloak_preview
    from ui.session import VisitorSession

    s = VisitorSession()
    try:
        text, gallery, s2 = cloak_preview(tiny_engine, s, 8, False)
        assert "No photos yet" in text and gallery == []
        s.crops[:] = crops
        text, gallery, _ = cloak_preview(tiny_engine, s, 8, True)
        assert "Cloaked 3 photos" in text and len(gallery) == 6
        assert all(str(path).startswith(str(s.dir)) for path, _ in gallery)  # served from the visitor's own dir
    finally:
        s.close()


# membership ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def session_with_lora(tiny_engine, crops):
    from core.events import drain
    from core.finetune.lora import FinetuneConfig, finetune
    from ui.session import VisitorSession

    s = VisitorSession()
    s.result = drain(
        finetune(tiny_engine.pipe, crops, FinetuneConfig(steps=3, checkpoint_every=0, preview_n=0, n_class=4))
    )
    s.trained_on = list(crops)
    yield s
    s.close()


def example_upload(tmp_path, i):
    """Example face ``i`` as the app receives a visitor's upload (a private upload folder, ui.uploads)."""
    from tests.raw_api import as_upload

    f = tmp_path / f"photo{i}.png"
    f.write_bytes(EXAMPLES[i].read_bytes())
    return str(as_upload(f))


def test_membership_check_without_calibration_shows_scores_and_says_why(
    tiny_engine, session_with_lora, tmp_path, monkeypatch
):
    import ui.membership_panel as mp

    monkeypatch.setattr(mp, "load_report", lambda name: None)
    uploads = [example_upload(tmp_path, 0), example_upload(tmp_path, 4)]
    text, gallery, _ = mp.check(tiny_engine, session_with_lora, None, uploads)
    assert (
        "against your LoRA from the Fine-tune tab" in text
        and "Scores only" in text
        and "python -m core.studies.membership" in text
    )
    assert len(gallery) == 2 and all("score" in c for _, c in gallery)
    assert not any(Path(p).exists() for p in uploads)  # the uploads were read once and deleted


def test_membership_check_reads_the_score_against_a_calibrated_threshold(
    tiny_engine, session_with_lora, tmp_path, monkeypatch
):
    import ui.membership_panel as mp
    from core.attack.membership import MembershipConfig, calibrate
    from core.model.prior import base_fingerprint

    cal = calibrate(
        np.array([0.5, 0.6]),
        np.linspace(-0.1, 0.1, 50),
        np.array([-0.2]),
        0.05,
        base_fingerprint(tiny_engine.pipe),
        80,
        20,
        MembershipConfig(timesteps=(200, 400), noises=2),
    )
    rate = dict(rate=0.9, ci=[0.8, 1.0], photos=100)
    row = dict(
        tpr=rate,
        fpr_unseen=dict(rate, rate=0.06),
        fpr_others=dict(rate, rate=0.01),
        auc_unseen=dict(auc=0.97, ci=[0.9, 1.0]),
    )
    report = json.loads(json.dumps(dict(calibration=asdict(cal), rows={"80": row}, n_victims=20)))
    monkeypatch.setattr(mp, "load_report", lambda name: report)
    text, gallery, _ = mp.check(tiny_engine, session_with_lora, None, [example_upload(tmp_path, 1)])
    assert ("**above** the threshold" in text) or ("below the threshold" in text)
    assert "calibrated on 20 other people's 80-step LoRAs" in text and "flags **90%**" in text
    assert "records 3 fine-tuning steps, the threshold was set for 80" in text  # the session's LoRA is a 3-step one
    with pytest.raises(gr.Error, match="photos with one face"):
        mp.check(tiny_engine, session_with_lora, None, [])


def test_membership_check_needs_a_lora(tiny_engine, tmp_path):
    import ui.membership_panel as mp
    from tests.raw_api import as_upload
    from ui.session import VisitorSession

    s = VisitorSession()
    try:
        with pytest.raises(gr.Error, match="Upload a LoRA file"):
            mp.check(tiny_engine, s, None, [example_upload(tmp_path, 2)])
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"not a safetensors file at all")
        with pytest.raises(gr.Error, match="refused"):
            mp.check(tiny_engine, s, str(as_upload(bad)), [example_upload(tmp_path, 3)])
        with pytest.raises(gr.Error, match="not a file you uploaded"):  # only the visitor's own uploads are read
            mp.check(tiny_engine, s, str(bad), [example_upload(tmp_path, 2)])
        assert bad.exists()
    finally:
        s.close()


def test_membership_uploads_read_when_they_arrive_serve_the_button(tiny_engine, session_with_lora, tmp_path):
    """Photos and LoRA file are read once, when they arrive (ui.uploads); the button then finds what
    came of them in the session, though the uploads themselves are gone."""
    import ui.membership_panel as mp
    from core.finetune.lora import save_lora
    from tests.raw_api import as_upload
    from ui.finetune_tab import read_faces
    from ui.session import VisitorSession

    s = VisitorSession()
    try:
        photos = [example_upload(tmp_path, 0), example_upload(tmp_path, 1)]
        crops, left, _ = read_faces(photos, tiny_engine.image_size, s)  # the upload event
        lora = as_upload(save_lora(tmp_path / "shared.safetensors", session_with_lora.result))
        assert mp.lora_checked(tiny_engine, s, str(lora)).startswith("**LoRA file checked**")
        assert len(crops) == 2 and not left and not lora.exists() and not any(Path(p).exists() for p in photos)
        text, gallery, _ = mp.check(tiny_engine, s, str(lora), photos)
        assert "against the uploaded LoRA file" in text and len(gallery) == 2
    finally:
        s.close()


# the Defenses tab's cloaking section ------------------------------------------------------------------


def test_defenses_tab_says_when_the_cloaking_study_has_not_run_and_shows_it_when_it_has(tmp_path):
    from core.studies import cloaking as cs
    from ui.defenses_tab import cloaking_view

    head, fig, table = cloaking_view(tmp_path / "missing.json")
    assert "has not been run yet" in head and fig is None and table == ""
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(3, 128))
    floor_d = np.full(3, 0.5)
    rows, clean = [], None
    for kind, budget in [("clean", None), ("purified", None), ("cloaked", 8.0), ("cloaked+purified", 8.0)]:
        v = cs.Variant(
            kind,
            budget,
            [],
            psnr=[] if kind == "clean" else [33.0, 34.0, 35.0],
            ssim=[] if kind == "clean" else [0.9, 0.91, 0.92],
            loss_gain=[1.3, 1.2, 1.4] if "cloaked" in kind else [],
        )
        row = cs.make_row(
            v, rng.uniform(0.3, 0.5, 3), gallery + rng.normal(scale=0.05, size=(3, 128)), gallery, floor_d, clean
        )
        clean = clean or row
        rows.append(row)
    rows.append(cs.make_row(cs.Variant("floor", None, []), floor_d, None, gallery, floor_d, None))
    r = dict(
        n=3,
        chance_top1=1 / 3,
        chance_top5=1.0,
        rows=rows,
        attack_measured=True,
        cloak=dict(steps=10, surrogate="lora"),
        purify_words="JPEG quality 75",
        budgets=[8.0],
        recipe_steps=80,
        base="x",
        attacker="a",
        command="python -m core.studies.cloaking",
    )
    r["conclusion"] = cs.conclusion(r)
    path = tmp_path / "cloaking.json"
    path.write_text(json.dumps(r, allow_nan=False))
    head, fig, table = cloaking_view(path)
    assert "Measured on 3 people" in head and fig is not None and "cloaked photos, budget 8/255" in table
    assert "What the numbers say" in table and "Against the papers" in table
