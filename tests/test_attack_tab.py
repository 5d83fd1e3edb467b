"""The Attack tab (through gradio_client) and the Fine-tune tab's live attack, on the embedded model
with a throwaway *untrained* attacker (the trained asset is not needed: these test the wiring)."""

import pickle

import numpy as np
import pytest
from PIL import Image

from core import ASSETS
from tests.conftest import launched_app
from tests.raw_api import as_upload

EXAMPLES = sorted((ASSETS / "examples" / "person_1000").glob("*.png"))


@pytest.fixture(scope="module")
def example_crops(base_engine):
    from core.faces.ingest import ingest_face

    return [ingest_face(p.read_bytes(), size=base_engine.image_size).crop for p in EXAMPLES[:3]]


@pytest.fixture(scope="module")
def tiny_result(base_engine, example_crops):
    from core.events import drain
    from core.finetune.lora import FinetuneConfig, finetune

    return drain(finetune(base_engine.pipe, example_crops, FinetuneConfig(steps=2, checkpoint_every=0, preview_n=0)))


@pytest.fixture(scope="module")
def attack_engine(base_engine, tiny_result, tmp_path_factory):
    """An Engine whose attacker is an untrained one for the embedded base (saved and loaded like the asset)."""
    from core.attack.attacker import Attacker, config_for, save_attacker
    from core.engine import Engine
    from core.finetune.lora import encode_prompt
    from core.model.prompts import CLASS_PROMPT

    pipe = base_engine.pipe
    cfg = config_for(pipe, tiny_result.lora, rank=4, alpha=4.0)
    model = Attacker(cfg, class_embedding=encode_prompt(pipe, CLASS_PROMPT)[0])
    path = save_attacker(model, tmp_path_factory.mktemp("attacker") / "att.safetensors")
    engine = Engine(attacker=str(path))
    assert engine.attacker()[0] is not None
    return engine


@pytest.fixture(scope="module")
def running_attack_app(attack_engine):
    yield from launched_app(attack_engine)


def test_attack_tab_refuses_bad_files_then_attacks_a_good_one(running_attack_app, attack_engine, tiny_result, tmp_path):
    from gradio_client import Client, handle_file

    from core.finetune.lora import save_lora

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"lora": [1.0, 2.0]}))
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    good = save_lora(tmp_path / "mine.safetensors", tiny_result)
    client = Client(running_attack_app.local_url, verbose=False)

    status, attack, naive, fx, refs, table = client.predict(handle_file(str(evil)), 80, None, api_name="/attack")
    assert "refused" in status and "pickle" in status and "arbitrary code" in status
    assert attack == [] and table == ""
    status, *_ = client.predict(handle_file(str(noise)), 80, None, api_name="/attack")
    assert "refused" in status and "not a readable .safetensors file" in status

    ref_files = [handle_file(str(p)) for p in EXAMPLES[3:6]]
    status, attack, naive, fx, refs, table = client.predict(handle_file(str(good)), 500, ref_files, api_name="/attack")
    assert "Attacked the uploaded LoRA" in status and "fine-tuning step 2 (recorded in the file)" in status
    for gallery in (attack, naive, fx):
        assert len(gallery) == 4
        img = np.asarray(Image.open(gallery[0]["image"]))
        assert img.shape[:2] == (attack_engine.image_size,) * 2 and img.std() > 5
    assert [g["caption"] for g in attack] == ["seed 0", "seed 1", "seed 2", "seed 3"]
    assert len(refs) == 3
    assert "your reference photos" in table and "| the attacker's reconstruction |" in table
    assert "floor: a random face from the base model" in table and "not available" not in table


def test_attack_file_deletes_uploads_and_works_without_attacker(attack_engine, tiny_result, tmp_path, monkeypatch):
    import gradio as gr

    from core.finetune.lora import save_lora
    from ui.attack_tab import attack_file

    evil = tmp_path / "upload.bin"
    evil.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    upload = as_upload(evil)
    status, *_ = attack_file(attack_engine, str(upload), 80, None, None)
    assert "zip archive" in status and not upload.exists()
    status, *_ = attack_file(attack_engine, str(evil), 80, None, None)  # not an upload: refused untouched
    assert "not a file you uploaded" in status and evil.exists()
    with pytest.raises(gr.Error):
        attack_file(attack_engine, None, 80, None, None)

    monkeypatch.setattr(attack_engine, "attacker", lambda: (None, "No trained attacker found at `x`."))
    good = as_upload(save_lora(tmp_path / "lora.safetensors", tiny_result))
    status, attack, naive, fx, refs, table = attack_file(attack_engine, str(good), 80, None, None)
    assert not good.exists()
    assert "trained attacker did not run:** No trained attacker found" in status
    assert attack == [] and len(naive) == len(fx) == 4 and refs == []
    assert "without reference photos of the person there is nothing to score" in table


def test_live_finetune_shows_reconstructions_then_attack_my_lora(attack_engine, example_crops):
    import plotly.graph_objects as go

    from ui.attack_tab import attack_mine
    from ui.finetune_tab import FINETUNE_OUTPUTS, train_run
    from ui.session import VisitorSession

    session = VisitorSession(crops=list(example_crops))
    try:
        updates = list(train_run(attack_engine, session, 4, 4, 3e-3, 0, False))
        assert all(set(u) <= set(FINETUNE_OUTPUTS) for u in updates)
        recon = [u["attack_gallery"] for u in updates if isinstance(u.get("attack_gallery"), list)]
        assert recon and [c for _, c in recon[-1]] == ["step 4", "step 4"]
        assert recon[-1][0][0].shape == (attack_engine.image_size,) * 2 + (3,)
        assert any(u.get("attack_head", "").endswith("from the LoRA weights alone, step 4") for u in updates)
        score = [u["attack_score"] for u in updates if u.get("attack_score")][-1]
        assert "Identity score at step 4" in score and "a random face from the base model" in score
        assert "secret trigger, which the attacker does not have (2 preview images): **" in score
        fig = [u["attack_plot"] for u in updates if isinstance(u.get("attack_plot"), go.Figure)][-1]
        assert [list(t.x) for t in fig.data] == [[4], [4]] and all(t.y[0] is not None for t in fig.data)
        assert "Done: 4 steps" in updates[-1]["status"] and session.trained_on

        status, attack, naive, fx, refs, table = attack_mine(attack_engine, session)
        assert "Attacked your LoRA from the Fine-tune tab" in status
        assert len(attack) == len(naive) == len(fx) == 4 and len(refs) == 3
        assert "ceiling: your LoRA with its secret trigger" in table
    finally:
        session.close()


def test_live_attack_says_why_when_there_is_no_attacker(base_engine, example_crops, monkeypatch):
    from ui.finetune_tab import train_run
    from ui.session import VisitorSession

    monkeypatch.setattr(base_engine, "attacker", lambda: (None, "No trained attacker found at `x`."))
    session = VisitorSession(crops=list(example_crops))
    try:
        first = next(train_run(base_engine, session, 4, 4, 3e-3, 0, False))
        assert "live attack is not available:** No trained attacker found" in first["attack_head"]
        assert first["attack_gallery"].visible is False
    finally:
        session.close()


def test_a_lora_read_when_it_arrives_serves_the_attack_and_the_metadata_panel(attack_engine, tiny_result, tmp_path):
    """An upload is read once, when it arrives (ui.uploads): that one reading checks the LoRA and scans
    its metadata, so both buttons still work once the upload itself is gone; nobody else gets either."""
    from pathlib import Path

    from core.finetune.lora import save_lora
    from ui.attack_tab import lora_arrived, read_lora_upload
    from ui.metadata_panel import scan_upload
    from ui.session import VisitorSession

    s, other = VisitorSession(), VisitorSession()
    try:
        upload = as_upload(save_lora(tmp_path / "mine.safetensors", tiny_result))
        status = lora_arrived(attack_engine, str(upload), s)
        assert status.startswith("**LoRA file checked**") and "Press **Attack this LoRA file**" in status, status
        assert not upload.exists()
        assert read_lora_upload(attack_engine, str(upload), s).rank == tiny_result.config.rank
        report, rest, cleaned = scan_upload(str(upload), s)
        assert "metadata entries" in report and Path(cleaned).is_file() and s.path in Path(cleaned).parents
        report, _, cleaned = scan_upload(str(upload), other)  # the path names nothing for another session
        assert "please upload it again" in report and cleaned is None
    finally:
        s.close()
        other.close()
