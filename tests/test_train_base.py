"""The base-model recipe runs end to end on a tiny config, resumes, and can be cancelled."""

import json

import pytest

from core.events import Done, Progress, drain
from core.train_base import BaseTrainConfig, train_base


@pytest.fixture()
def tiny_cfg(tmp_path, lfw_root):
    return BaseTrainConfig(
        work=str(tmp_path / "work"), out=str(tmp_path / "base"), vae_steps=2, unet_steps=2,
        vae_batch=4, unet_batch=4, limit_images=16, save_every=1,
    )


def test_tiny_build_runs_and_loads(tiny_cfg):
    from core.pipeline import load_pipeline, sample_images

    events = list(train_base(tiny_cfg))
    stages = {e.stage for e in events if isinstance(e, Progress)}
    assert stages == {"vae", "unet"}
    assert isinstance(events[-1], Done) and not events[-1].cancelled
    rec = json.loads((events[-1].result / "train_config.json").read_text())
    assert rec["n_images"] == 16 and rec["command"].startswith("python -m core.train_base")
    pipe = load_pipeline(events[-1].result, device="cpu")
    assert sample_images(pipe, n=1, steps=2)[0].shape == (64, 64, 3)


def test_resume_continues_from_the_checkpoint(tiny_cfg):
    drain(train_base(tiny_cfg))
    more = BaseTrainConfig(**{**tiny_cfg.__dict__, "unet_steps": 3})
    events = list(train_base(more))
    unet_steps = [e.step for e in events if isinstance(e, Progress) and e.stage == "unet"]
    vae_steps = [e.step for e in events if isinstance(e, Progress) and e.stage == "vae"]
    assert unet_steps == [3] and vae_steps == []  # only the missing step ran


def test_cancel_stops_between_steps(tiny_cfg):
    seen = []
    ev = train_base(tiny_cfg, should_stop=lambda: len(seen) >= 1)
    for e in ev:
        if isinstance(e, Progress):
            seen.append(e)
    assert len(seen) == 1 and isinstance(e, Done) and e.cancelled
