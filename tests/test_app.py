"""The app starts offline on the embedded model and answers a gradio_client call."""

import numpy as np
import pytest
from PIL import Image

from tests.conftest import launched_app


@pytest.fixture(scope="module")
def running_app(base_engine):
    yield from launched_app(base_engine)


def test_sample_endpoint_answers_a_client(running_app):
    from gradio_client import Client

    client = Client(running_app.local_url, verbose=False)
    out = client.predict(3, 2, 5, 1.0, api_name="/sample")
    assert len(out) == 2
    img = np.asarray(Image.open(out[0]["image"]))
    assert img.shape[:2] == (64, 64) and img.std() > 5


def test_every_tab_is_there(running_app):
    labels = {b.label for b in running_app.blocks.values() if type(b).__name__ == "Tab"}
    assert {"Fine-tune", "Attack", "Layers", "Defenses", "Watermark", "About"} <= labels


def test_finetune_through_the_client(running_app, lfw_root, tmp_path, monkeypatch):
    """Upload 3 real photos + 1 bad file, train a short LoRA, get the file back (one client = one session)."""
    from gradio_client import Client, handle_file
    from core.faces import data

    split = data.Split.load()
    photos = [str(p) for p in split.paths("victims", lfw_root)[split.victims[2]][:3]]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    client = Client(running_app.local_url, verbose=False)
    crops, report = client.predict([handle_file(p) for p in photos + [str(bad)]], api_name="/ingest")
    assert len(crops) == 3 and "3 usable photos" in report and "bad.png" in report
    status, plot, previews, score, lora_file, *live_attack = client.predict(20, 4, 2e-3, 0, False, api_name="/train")
    assert "Done: 20 steps" in status and "trigger word" in status.lower()
    assert "random face from the base model" in score
    from core.finetune.lora import load_lora
    lora, meta = load_lora(lora_file)
    assert meta["leaklab_steps"] == "20"


def test_handlers_run_under_spaces_gpu_where_the_package_exists(monkeypatch, tiny_engine):
    """On a ZeroGPU Space (the ``spaces`` package present) every model-running handler is wrapped in
    ``spaces.GPU``; without the package nothing is wrapped (this machine, a plain GPU Space)."""
    import importlib.machinery
    import sys
    import types

    import app
    from ui import gpu

    wrapped = []

    def GPU(duration=60):
        def deco(fn):
            def inner(*a, **k):
                return fn(*a, **k)

            wrapped.append((fn, duration))
            return inner
        return deco

    assert gpu.on_gpu(len) is len  # no spaces package here
    fake = types.ModuleType("spaces")
    fake.GPU = GPU
    fake.__spec__ = importlib.machinery.ModuleSpec("spaces", None)
    monkeypatch.setitem(sys.modules, "spaces", fake)
    app.build_demo(tiny_engine)
    names = {getattr(fn, "__name__", "") for fn, _ in wrapped}
    assert {"run", "sample", "swap", "attack_upload"} <= names and len(wrapped) >= 6
    assert all(0 < d <= 300 for _, d in wrapped)
