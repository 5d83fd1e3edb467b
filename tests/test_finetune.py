"""DreamBooth-LoRA engine on the tiny random pipeline: events, cancel, export to stock diffusers."""

import numpy as np
import pytest
import torch

from core.events import Checkpoint, Done, Preview, Progress
from core.finetune.lora import FinetuneConfig, finetune, load_lora, pipeline_with_lora, save_lora
from core.model.pipeline import load_pipeline, sample_images
from core.model.prompts import instance_prompt, trigger_words


def crops(n, size=64):
    return [np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(n)]


TINY = dict(steps=4, checkpoint_every=2, n_class=4, batch=2, preview_steps=2, preview_n=1)


def test_events_and_result(tiny_pipe):
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    events = list(finetune(tiny_pipe, crops(3), FinetuneConfig(**TINY)))
    kinds = [type(e) for e in events]
    assert kinds.count(Progress) == 4 and kinds.count(Checkpoint) == 2 and kinds.count(Preview) == 2
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1, 2, 3, 4] and all(np.isfinite(p.metrics["loss"]) for p in progress)
    res = events[-1].result
    assert isinstance(events[-1], Done) and not events[-1].cancelled
    assert res.trigger in trigger_words() and res.steps_done == 4
    assert any(k.endswith("lora_A.weight") for k in res.lora) and all(k.startswith("unet.") for k in res.lora)
    ckpt = [e for e in events if isinstance(e, Checkpoint)][-1]
    assert all(torch.equal(ckpt.lora[k], res.lora[k]) for k in res.lora)
    after = tiny_pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the shared base is untouched


def test_cancel_between_steps(tiny_pipe):
    seen = []
    gen = finetune(tiny_pipe, crops(3), FinetuneConfig(**{**TINY, "steps": 50}), should_stop=lambda: len(seen) >= 3)
    for e in gen:
        if isinstance(e, Progress):
            seen.append(e)
    assert len(seen) == 3 and isinstance(e, Done) and e.cancelled and e.result.steps_done == 3


@pytest.mark.parametrize("n", [0, 1, 2, 11])
def test_photo_count_is_checked(tiny_pipe, n):
    with pytest.raises(ValueError, match="3 to 10 photos"):
        next(finetune(tiny_pipe, crops(n), FinetuneConfig(**TINY)))


@pytest.mark.parametrize("bad", [dict(rank=0), dict(steps=0), dict(lr=0.0), dict(alpha=-1.0), dict(unet_targets=())])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        FinetuneConfig(**bad)


@pytest.mark.parametrize("text_encoder", [False, True])
def test_export_loads_in_stock_diffusers(tiny_pipe, tiny_pipeline_dir, tmp_path, text_encoder):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    res = list(finetune(tiny_pipe, crops(3), FinetuneConfig(**{**TINY, "text_encoder": text_encoder})))[-1].result
    for k in res.lora:  # make the LoRA's effect large, so "loaded" and "not loaded" differ clearly
        if "lora_B" in k:
            res.lora[k] = torch.randn_like(res.lora[k]) * 0.5
    path = save_lora(tmp_path / "lora.safetensors", res)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert res.trigger not in path.read_bytes().decode("latin-1")  # the trigger stays out of the file
    assert meta["leaklab_base_fingerprint"] == res.base and meta["leaklab_rank"] == str(res.config.rank)

    stock = StableDiffusionPipeline.from_pretrained(
        tiny_pipeline_dir, safety_checker=None, requires_safety_checker=False
    )
    stock.load_lora_weights(str(path))
    prompt = instance_prompt(res.trigger)
    ours = sample_images(pipeline_with_lora(tiny_pipe, res.lora), prompt, n=2, steps=3)
    theirs = sample_images(stock, prompt, n=2, steps=3)
    base = sample_images(tiny_pipe, prompt, n=2, steps=3)
    diff = lambda a, b: max(np.abs(x.astype(int) - y).max() for x, y in zip(a, b))
    assert diff(ours, theirs) <= 2 < diff(ours, base)

    back, _ = load_lora(path)
    assert set(back) == set(res.lora) and all(torch.allclose(back[k], res.lora[k]) for k in back)


def test_cli_trains_skips_bad_photos_and_writes_a_lora(lfw_root, tmp_path, monkeypatch):
    """python -m core.finetune.lora on 3 real photos + 1 non-image, with the shipped base model."""
    import subprocess
    import sys

    from core import PROJECT_ROOT
    from core.faces import data

    split = data.Split.load()
    photos = [str(p) for p in split.paths("victims", lfw_root)[split.victims[1]][:3]]
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    out = tmp_path / "me.safetensors"
    env = {**__import__("os").environ, "LEAKLAB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "core.finetune.lora",
            *photos,
            str(bad),
            "--out",
            str(out),
            "--steps",
            "3",
            "--n-class",
            "4",
            "--checkpoint-every",
            "0",
        ],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped" in proc.stdout and "notes.jpg" in proc.stdout
    assert out.is_file() and "trigger word" in proc.stdout
    lora, meta = load_lora(out)
    assert meta["leaklab_steps"] == "3" and len(lora) > 0


@pytest.mark.gpu
def test_tiny_finetune_on_cuda_with_mixed_precision(tiny_pipeline_dir):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pipe = load_pipeline(tiny_pipeline_dir, device="cuda")  # float16 weights, as an SD 1.x id would load
    assert pipe.unet.dtype == torch.float16
    res = list(finetune(pipe, crops(3), FinetuneConfig(**TINY)))[-1].result
    assert res.steps_done == 4 and all(torch.isfinite(v).all() for v in res.lora.values())
