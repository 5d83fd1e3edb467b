"""Shared fixtures: offline hub, the LFW folder (tests that need it skip without it), a tiny
random pipeline saved to disk (the diffusers-tests "dummy components" idea)."""

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

# this test process's own session root and Gradio upload folder: the app empties both at start-up
# and shutdown, which must never touch another process's visitors (other test runs on this machine)
_PRIVATE = tempfile.mkdtemp(prefix="leaklab-tests-")
atexit.register(shutil.rmtree, _PRIVATE, True)
os.environ.setdefault("LEAKLAB_SESSION_ROOT", os.path.join(_PRIVATE, "sessions"))
os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(_PRIVATE, "gradio"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# core only after the environment above: huggingface_hub (imported by diffusers) reads HF_HUB_OFFLINE once, at import
from core.faces import data  # noqa: E402
from core.model.pipeline import DEFAULT_BASE  # noqa: E402


@pytest.fixture(scope="session")
def lfw_root():
    root = data.default_lfw_root()
    if not root.is_dir():
        pytest.skip(f"LFW folder not found at {root} (set LEAKLAB_LFW)")
    return root


@pytest.fixture(scope="session")
def lfw_photo(lfw_root):
    """Path of one original (250x250) LFW photo of a victim identity (read, never copied)."""
    split = data.Split.load()
    return data.list_identities(lfw_root)[split.victims[0]][0]


@pytest.fixture(scope="session")
def tiny_components():
    from core.model.pipeline import build_components

    return build_components(
        unet_channels=(32, 32),
        vae_channels=(16, 16, 32),
        text_width=32,
        text_layers=1,
        image_size=64,
        seed=0,
        latent_channels=4,
    )


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory, tiny_components):
    """A tiny random StableDiffusionPipeline saved with save_pretrained (stands in for a hub model)."""
    from core.model.pipeline import assemble_pipeline, save_pipeline

    out = tmp_path_factory.mktemp("tiny_sd")
    save_pipeline(assemble_pipeline(tiny_components), out, half=False)
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def tiny_pipe(tiny_pipeline_dir, tmp_path_factory, monkeypatch_module):
    """The tiny pipeline loaded on CPU, with a private cache folder (class images etc.)."""
    from core.model.pipeline import load_pipeline

    monkeypatch_module.setenv("LEAKLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    return load_pipeline(tiny_pipeline_dir, device="cpu")


def launched_app(engine):
    """The app built on ``engine``, served on a free local port; yields the running demo, then closes it."""
    import socket

    import app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = app.build_demo(engine)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield demo
    demo.close()


def random_crops(n, size=64):
    return [np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_engine(tiny_pipeline_dir, tmp_path_factory, monkeypatch_module):
    """An app Engine on the tiny random pipeline (32 px; no attacker fits it): fast fine-tunes for app tests."""
    from core.engine import Engine

    monkeypatch_module.setenv("LEAKLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    return Engine(str(tiny_pipeline_dir), "cpu")


@pytest.fixture(scope="session")
def base_engine():
    """The shipped embedded model, loaded once for every test that uses it."""
    if not (DEFAULT_BASE / "model_index.json").exists():
        pytest.fail("assets/base is missing: the embedded model must ship with the repo")
    from core.engine import Engine

    return Engine()


def rng_image(seed=0, size=(64, 64)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def sd1_pipeline_dir(tmp_path_factory):
    """A tiny random pipeline with Stable Diffusion 1.x's layout (tests/sd1x.py), saved like a hub model."""
    from tests.sd1x import save_sd1_pipeline

    return save_sd1_pipeline(tmp_path_factory.mktemp("tiny_sd1"))


@pytest.fixture(scope="module")
def sd1_pipe(sd1_pipeline_dir, tmp_path_factory, monkeypatch_module):
    """The SD 1.x-layout pipeline loaded on CPU, with a private cache folder."""
    from core.model.pipeline import load_pipeline

    monkeypatch_module.setenv("LEAKLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    return load_pipeline(sd1_pipeline_dir, device="cpu")
