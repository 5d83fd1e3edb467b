"""The app starts offline on the embedded model and answers a gradio_client call."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import launched_app


@pytest.fixture(scope="module")
def running_app(base_engine):
    yield from launched_app(base_engine)


def test_sample_endpoint_answers_a_client(running_app, base_engine):
    from gradio_client import Client

    client = Client(running_app.local_url, verbose=False)
    out = client.predict(3, 2, 5, 1.0, api_name="/sample")
    assert len(out) == 2
    img = np.asarray(Image.open(out[0]["image"]))
    assert img.shape[:2] == (base_engine.image_size,) * 2 and img.std() > 5


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


# Space-ready: launch settings, hub, ZeroGPU, the Space's own config --------------------------------


@pytest.fixture(scope="module")
def tiny_app(tiny_engine):
    yield from launched_app(tiny_engine)


def test_launch_keeps_visits_private(tiny_app, tmp_path):
    """No run history (the browser keeps no record of a visit, /gradio_api/runs is gone), no public
    /monitoring, and uploads over the largest legitimate input (a 64 MB LoRA) refused while they
    stream in, their bytes deleted at once."""
    import httpx
    from gradio.utils import get_upload_folder

    url = tiny_app.local_url.rstrip("/")
    config = httpx.get(f"{url}/config").json()
    assert config["run_history"] is False and config["max_file_size"] == 64 * 2**20
    assert httpx.get(f"{url}/gradio_api/runs").status_code == 404
    for path in ("/monitoring", "/monitoring/summary"):
        assert httpx.get(f"{url}{path}").status_code in (403, 404), path
    before = {p for p in Path(get_upload_folder()).rglob("*") if p.is_file()}
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.truncate(64 * 2**20 + 1)
    with open(big, "rb") as f:
        r = httpx.post(f"{url}/gradio_api/upload", files=[("files", ("big.safetensors", f))], timeout=60)
    assert r.status_code == 413 and "maximum allowed size" in r.text
    assert {p for p in Path(get_upload_folder()).rglob("*") if p.is_file()} - before == set()


def test_refused_bytes_are_freed_at_once(tiny_app, tmp_path):
    """Four 60 MB files refused by the Attack tab leave no memory behind (they used to be kept for
    10 minutes: +240 MB)."""
    import gc

    import psutil

    from tests.raw_api import Visitor, file_data

    def junk(i):  # different bytes each time (Gradio would store identical ones at one path)
        path = tmp_path / f"junk{i}.safetensors"
        with open(path, "wb") as f:
            f.write(os.urandom(60 * 2**20))
        return path

    v = Visitor(tiny_app.local_url)
    v.call("attack", file_data(v.upload(junk(0))), 80, None)  # warm-up: allocator pools, lazy imports
    gc.collect()
    rss = psutil.Process().memory_info().rss
    for i in range(1, 5):
        ok, (status, *_) = v.call("attack", file_data(v.upload(junk(i))), 80, None)
        assert ok and "refused" in status
    gc.collect()
    grown = (psutil.Process().memory_info().rss - rss) / 2**20
    v.close()
    assert grown < 100, f"{grown:.0f} MB kept after four refused 60 MB files"


def run_python(code: str, **env) -> str:
    import subprocess
    import sys

    from core import PROJECT_ROOT

    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LEAKLAB_MODEL")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, env={**base, **env}, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_the_embedded_default_runs_offline_by_itself():
    """On the embedded model the app sets HF_HUB_OFFLINE=1 itself (before huggingface_hub reads it);
    with another model named it leaves the hub reachable."""
    code = "import app, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    assert run_python(code) == "True"
    assert run_python(code, LEAKLAB_MODEL="runwayml/stable-diffusion-v1-5") == "False"


def test_zero_gpu_imports_spaces_before_torch_and_loads_on_cuda(tmp_path):
    """The ZeroGPU docs' pattern: ``import spaces`` before torch touches CUDA (checked: before torch
    is even imported), the pipeline placed on cuda at start-up, handlers decorated."""
    fake = tmp_path / "spaces"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import sys\nTORCH_FIRST = 'torch' in sys.modules\ndef GPU(duration=60):\n    return lambda fn: fn\n"
    )
    code = (
        "import sys, app, spaces\n"
        "seen = {}\n"
        "class E:\n"
        "    def __init__(self, model, device, **kw):\n"
        "        seen['device'] = device\n"
        "        raise SystemExit(0)\n"
        "app.Engine = E\n"
        "try:\n    app.main([])\nexcept SystemExit:\n    pass\n"
        "print(spaces.TORCH_FIRST, seen['device'])"
    )
    assert run_python(code, PYTHONPATH=str(tmp_path), SPACES_ZERO_GPU="true") == "False cuda"
    assert run_python(code, PYTHONPATH=str(tmp_path)) == "False None"  # elsewhere the model picks its device


def test_the_space_reads_its_settings_from_the_readme():
    """Spaces read only the README's front matter: the hardware suggestion lives there; the Spacefile
    is the project's design card and says so."""
    from core import PROJECT_ROOT

    front = (PROJECT_ROOT / "README.md").read_text().split("---")[1]
    fields = dict(line.split(":", 1) for line in front.strip().splitlines())
    assert fields["suggested_hardware"].strip() in ("cpu-basic", "cpu-upgrade")
    assert fields["app_file"].strip() == "app.py"
    card = (PROJECT_ROOT / "Spacefile").read_text()
    assert "design card" in card.lower() and "not read by" in card.lower()


def test_pytest_shows_the_deprecations_of_the_pinned_libraries():
    """No blanket ignore of FutureWarning / DeprecationWarning: filters name a module or a message."""
    from core import PROJECT_ROOT

    filters = (PROJECT_ROOT / "pytest.ini").read_text().split("filterwarnings", 1)[-1]
    for line in filters.splitlines():
        parts = line.strip().split(":")
        if parts[0] == "ignore" and len(parts) >= 3 and parts[2].endswith("Warning"):
            assert len(parts) >= 4 and (parts[1] or parts[3]), f"blanket filter: {line.strip()}"
