"""Any SD 1.x LoRA in the app: on the tiny SD 1.x-layout pipeline (tests/sd1x.py) the Attack tab reads a
kohya file with a text encoder and LoCon layers, runs the attacks that need no training and says the
trained attacker exists only for the embedded base; its metadata panel flags the leaks and hands out a
cleaned copy; the Layers tab draws the file's layers. Through gradio_client, as a browser sends it."""

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from core.layers.change import forward_order
from tests import sd1x
from tests.conftest import launched_app
from tests.sd1x import LEAKS, LOCON, TEXT, UNET_ATTN, reference_lora


@pytest.fixture(scope="module")
def sd1_engine(sd1_pipeline_dir, tmp_path_factory, monkeypatch_module):
    from core.engine import Engine

    monkeypatch_module.setenv("LEAKLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    return Engine(str(sd1_pipeline_dir), "cpu")


@pytest.fixture(scope="module")
def client(sd1_engine):
    from gradio_client import Client

    for demo in launched_app(sd1_engine):
        c = Client(demo.local_url, verbose=False)
        yield c
        c.close()


@pytest.fixture(scope="module")
def kohya(sd1_engine, tmp_path_factory):
    """(file, reference): a kohya LoRA with text-encoder and LoCon layers, per-layer ranks and alphas, and
    kohya's metadata."""
    ref = reference_lora(
        sd1_engine.pipe,
        unet=UNET_ATTN + ("proj_in", "ff.net.2") + LOCON,
        text=TEXT,
        ranks=(4, 2),
        alphas=(3.0, 1.5),
        dtype=torch.float16,
    )
    path = tmp_path_factory.mktemp("upload") / "anna_lora_v2.safetensors"
    return sd1x.write(path, sd1x.kohya_tensors(ref), sd1x.kohya_metadata()), ref


def data_section(path):
    with open(path, "rb") as fh:
        raw = fh.read()
    return raw[8 + struct.unpack("<Q", raw[:8])[0] :]


def test_metadata_panel_flags_the_leaks_and_hands_out_a_cleaned_copy(client, kohya):
    from gradio_client import handle_file
    from safetensors import safe_open

    path, _ = kohya
    report, rest, cleaned = client.predict(handle_file(str(path)), api_name="/scan_metadata")
    assert f"{len(sd1x.kohya_metadata())} metadata entries, {len(LEAKS)} of them give something away" in report
    for words in (
        "the captions of the training photos",
        "'sks woman' x23",
        "The trigger word is written in the file",
        "`sks woman`",
        "user name \\('alice'\\)",
        "a picture",
    ):
        assert words in report, words
    assert "| `ss_learning_rate` | `0.0001` | A training setting" in rest
    assert data_section(cleaned) == data_section(path)
    with safe_open(cleaned, "pt") as f:
        assert not set(f.metadata() or {}) & set(LEAKS)


def test_attack_tab_runs_the_weight_only_attacks_on_a_kohya_file(client, kohya, sd1_engine):
    from gradio_client import handle_file

    from core.model.pipeline import sample_images
    from core.model.prompts import CLASS_PROMPT

    path, ref = kohya
    status, attack, naive, fx, refs, table = client.predict(handle_file(str(path)), 80, None, api_name="/attack")
    assert "Attacked the uploaded LoRA" in status, status
    assert "kohya-ss / AUTOMATIC1111 file with convolution layers (LoCon)" in status
    assert "ranks 2-4 per layer" in status and "alpha 1.5-3 per layer" in status
    assert f"{len(ref.of('unet'))} UNet layers and {len(ref.of('text_encoder'))} text-encoder layers" in status
    assert "The trained attacker exists only for the embedded base model" in status
    assert attack == [] and table.startswith("**No identity score:**")
    base = sample_images(sd1_engine.pipe, CLASS_PROMPT, seed=[0, 1, 2, 3], steps=25)
    for gallery in (naive, fx):
        assert len(gallery) == 4
        img = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
        assert img.shape == (64, 64, 3)
    shown = np.asarray(Image.open(naive[0]["image"]).convert("RGB"))
    assert not np.array_equal(shown, base[0])  # the LoRA (UNet and text encoder) was merged in


def test_layers_tab_draws_the_files_layers(client, kohya):
    from gradio_client import handle_file

    path, ref = kohya
    status, plot, table = client.predict(handle_file(str(path)), api_name="/layers_file")
    assert "The uploaded LoRA" in status and "text-encoder layers are not shown" in status
    fig = json.loads(plot["plot"]) if isinstance(plot, dict) and "plot" in plot else plot
    heat = fig["data"][0]
    names = [c[0] for c in heat["customdata"][0]]
    assert names == forward_order([m.name for m in ref.of("unet")])
    assert "busiest of the uploaded LoRA's" in table


def test_a_refused_file_says_why_in_both_tabs(client, sd1_engine, tmp_path):
    from gradio_client import handle_file

    path = sd1x.write(tmp_path / "loha.safetensors", sd1x.loha(sd1_engine.pipe))
    status, *_ = client.predict(handle_file(str(path)), 80, None, api_name="/attack")
    assert status.startswith("**This file was refused.**") and "LoHa" in status
    status, plot, table = client.predict(handle_file(str(path)), api_name="/layers_file")
    assert status.startswith("**This file was refused.**") and "LoHa" in status and table == ""
