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


def test_appearance_captions_use_the_vocabulary(tiny_cfg):
    import numpy as np
    import torch

    from core.prompts import build_tokenizer
    from core.train_base import sample_captions

    labels = np.array([[i % 4, (3 * i) % 4] for i in range(200)])
    caps = sample_captions(labels, tiny_cfg, torch.Generator().manual_seed(0))
    named = [c for c in caps if "ida" in c or "idb" in c]
    assert "" in caps and len(named) > 100  # empty prompts for guidance; most captions name clusters
    tok = build_tokenizer()
    unk = tok.unk_token_id
    assert all(unk not in tok(c).input_ids for c in caps)
    assert all(f"ida{labels[i, 0]:02d}" in c or f"idb{labels[i, 1]:02d}" in c for i, c in enumerate(caps) if c in named)


def test_vae_from_reuses_a_saved_vae_and_time_budget_stops_early(tiny_cfg, tmp_path):
    import torch

    from core.pipeline import load_pipeline

    first = drain(train_base(tiny_cfg))
    cfg = BaseTrainConfig(**{**tiny_cfg.__dict__, "work": str(tmp_path / "w2"), "out": str(tmp_path / "b2"),
                             "vae_from": str(first), "unet_steps": 1000, "unet_minutes": 1e-4})
    events = list(train_base(cfg))
    assert not [e for e in events if isinstance(e, Progress) and e.stage == "vae"]
    rec = json.loads((events[-1].result / "train_config.json").read_text())
    assert 1 <= rec["unet_steps_done"] < 1000 and "vae_trained_by" in rec
    a, b = load_pipeline(first, device="cpu").vae, load_pipeline(events[-1].result, device="cpu").vae
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
