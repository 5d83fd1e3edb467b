"""A short workshop through gradio_client on the app built on the tiny pipeline with an (untrained)
attacker: four visitors upload their own photos and press Train at once; the training hub trains them
together, and each gets their own live reconstructions and their own LoRA, never anyone else's
(the full-size run with timings is ``python -m bench.workshop``)."""

import threading
from pathlib import Path

import pytest

from tests.bad_inputs import private_photos
from tests.conftest import launched_app

VISITORS, STEPS = 4, 20


@pytest.fixture(scope="module")
def workshop_app(tiny_pipeline_dir, tmp_path_factory, monkeypatch_module):
    from core.attack.attacker import Attacker, config_for, save_attacker
    from core.engine import Engine
    from core.events import drain
    from core.finetune.lora import FinetuneConfig, encode_prompt, finetune
    from core.model.prompts import CLASS_PROMPT
    from tests.conftest import random_crops

    monkeypatch_module.setenv("LEAKLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    engine = Engine(str(tiny_pipeline_dir), "cpu")
    pipe = engine.pipe
    lora = drain(
        finetune(pipe, random_crops(3, engine.image_size), FinetuneConfig(steps=1, checkpoint_every=0, preview_n=0))
    ).lora
    model = Attacker(config_for(pipe, lora, rank=4, alpha=4.0), class_embedding=encode_prompt(pipe, CLASS_PROMPT)[0])
    engine._attacker_path = str(save_attacker(model, tmp_path_factory.mktemp("attacker") / "att.safetensors"))
    assert engine.attacker()[0] is not None
    yield from launched_app(engine)


def files_in(value) -> list[str]:
    """Server paths of the files in one output (a file, a gallery, or nothing)."""
    if isinstance(value, dict):
        if value.get("path"):
            return [value["path"]]
        return files_in(value.get("image")) + files_in(value.get("value"))
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in files_in(v)]
    return [value] if isinstance(value, str) and value.startswith("/") and not set(value) & set(" \n*") else []


def test_four_visitors_train_together_and_each_gets_only_their_own(workshop_app, tmp_path):
    from gradio_client import Client, handle_file

    from ui import session as sessions

    clients = [Client(workshop_app.local_url, verbose=False, download_files=False) for _ in range(VISITORS)]
    outputs = {}
    try:
        for i, c in enumerate(clients):
            report = c.predict(
                [handle_file(str(p)) for p in private_photos(tmp_path, i, tag=f"w{i}")], api_name="/ingest"
            )
            assert "3 usable photos" in report[1]
        jobs = [c.submit(STEPS, 4, 3e-3, i, False, api_name="/train") for i, c in enumerate(clients)]
        threads = [
            threading.Thread(target=lambda i=i: outputs.__setitem__(i, (jobs[i].result(timeout=600), jobs[i])))
            for i in range(VISITORS)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join(700)
    finally:
        for c in clients:
            c.close()
    folders = {}
    for i in range(VISITORS):
        final, job = outputs[i]
        updates = job.outputs()
        statuses = [str(u[0]) for u in updates]
        assert f"Done: {STEPS} steps" in statuses[-1]
        assert any("Training together with" in s for s in statuses), statuses  # the hub batched them
        reconstructions = [p for u in updates for p in files_in(u[7])]
        assert reconstructions, "no live reconstruction reached the visitor"
        lora = files_in(final[4])
        assert len(lora) == 1 and lora[0].endswith(".safetensors")
        mine = {p for u in updates for p in files_in(list(u))}
        folders[i] = {Path(p).relative_to(sessions.SESSION_ROOT).parts[0] for p in mine}  # their session folder
        assert len(folders[i]) == 1, f"visitor {i}'s files lie in several folders: {folders[i]}"
    assert len({f for fs in folders.values() for f in fs}) == VISITORS  # no visitor got a file of another
