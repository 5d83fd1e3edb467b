"""The base-model recipe runs end to end on a tiny config, resumes, can be cancelled, keeps
victims out, and exports a pipeline a stock ``from_pretrained`` samples."""

import json
import shutil

import numpy as np
import pytest

from core.events import Done, Progress, drain
from core.faces import data
from core.model.train_base import BaseTrainConfig, exclude_lookalikes, in_workers, learning_rate, train_base


@pytest.fixture(scope="module")
def fake_utkface(tmp_path_factory, lfw_root):
    """A UTKFace-layout folder of 6 LFW pretrain photos (read from LFW, copied only into tmp) and
    one exact duplicate, which must be dropped."""
    root = tmp_path_factory.mktemp("utk")
    paths = [p for ps in data.Split.load().paths("pretrain", lfw_root).values() for p in ps][100:106]
    for i, p in enumerate(paths):
        shutil.copy(p, root / f"{20 + i}_{i % 2}_{i % 5}_2017011{i}.jpg.chip.jpg")
    shutil.copy(paths[0], root / "99_0_0_20170119.jpg.chip.jpg")
    return root


@pytest.fixture()
def tiny_cfg(tmp_path, fake_utkface):
    return BaseTrainConfig(
        work=str(tmp_path / "work"),
        out=str(tmp_path / "base"),
        utkface=str(fake_utkface),
        unet_steps=2,
        unet_batch=4,
        limit_images=6,
        save_every=1,
        preview_every=0,
        heldout_utkface=2,
        exclude_distance=0.0,
        unet_channels="32,32",
        workers=1,
    )


def test_tiny_build_runs_and_a_stock_pipeline_samples_it(tiny_cfg):
    import torch
    from diffusers import StableDiffusionPipeline

    import core.model.autoencoder  # noqa: F401  (the autoencoder's class, as load_pipeline imports it)

    events = list(train_base(tiny_cfg))
    stages = [e.stage for e in events if isinstance(e, Progress)]
    assert list(dict.fromkeys(stages)) == [
        "photos: lfw aligned",
        "photos: utkface aligned",
        "descriptors: crops described",
        "latents: crops encoded",
        "unet",
    ]
    assert isinstance(events[-1], Done) and not events[-1].cancelled
    rec = json.loads((events[-1].result.folder / "train_config.json").read_text())
    assert rec["data_seen"]["photos"] == {"lfw": 6, "utkface": 4}  # 7 files - 1 duplicate - 2 held out
    assert rec["command"].startswith("python -m core.model.train_base")
    assert (events[-1].result.folder / "vae" / "LICENSE-TAEF2").exists()
    pipe = StableDiffusionPipeline.from_pretrained(events[-1].result.folder)  # no dtype argument
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}
    im = pipe("a photo of a face", num_inference_steps=2, output_type="np").images
    assert im.shape == (1, 128, 128, 3) and np.isfinite(im).all()


def test_resume_continues_from_the_checkpoint(tiny_cfg):
    drain(train_base(tiny_cfg))
    more = BaseTrainConfig(**{**tiny_cfg.__dict__, "unet_steps": 3})
    steps = [e.step for e in train_base(more) if isinstance(e, Progress) and e.stage == "unet"]
    assert steps == [3]  # only the missing step ran


def test_cancel_stops_between_steps(tiny_cfg):
    seen = []
    for e in train_base(tiny_cfg, should_stop=lambda: len(seen) >= 1):
        if isinstance(e, Progress) and e.stage == "unet":
            seen.append(e)
    assert len(seen) == 1 and isinstance(e, Done) and e.cancelled


def test_cancel_while_preparing_the_photos_stops_at_once(tiny_cfg):
    events = []
    for e in train_base(tiny_cfg, should_stop=lambda: any(isinstance(x, Progress) for x in events)):
        events.append(e)
    assert [e.stage for e in events if isinstance(e, Progress)] == ["photos: lfw aligned"]
    assert events[-1] == Done(None, cancelled=True)
    assert not list(tiny_cfg.work_dir.glob("photos_*.npz"))  # nothing half-done is cached


def test_time_budget_stops_early(tiny_cfg):
    cfg = BaseTrainConfig(**{**tiny_cfg.__dict__, "unet_steps": 1000, "unet_minutes": 1e-4})
    rec = json.loads((drain(train_base(cfg)).folder / "train_config.json").read_text())
    assert 1 <= rec["unet_steps_done"] < 1000


def test_lookalikes_of_protected_identities_are_dropped(tiny_cfg):
    """A UTKFace chip whose descriptor is a victim's is dropped; LFW pretrain photos never are."""
    rng = np.random.default_rng(0)
    prot = rng.normal(size=(3, 128)).astype(np.float32)
    tiny_cfg.work_dir.mkdir(parents=True, exist_ok=True)
    np.save(tiny_cfg.work_dir / f"protected_{tiny_cfg.size}.npy", prot)
    desc = np.stack([prot[1] + 0.01, prot[2], rng.normal(size=128) * 5, prot[0]]).astype(np.float32)
    cfg = BaseTrainConfig(**{**tiny_cfg.__dict__, "exclude_distance": 0.4})
    keep = exclude_lookalikes(cfg, desc, ["utkface", "utkface", "utkface", "lfw"])
    assert keep.tolist() == [False, False, True, True]


def test_appearance_captions_use_the_vocabulary(tiny_cfg):
    import torch

    from core.model.prompts import build_tokenizer
    from core.model.train_base import sample_captions

    labels = np.array([[i % 4, (3 * i) % 4] for i in range(200)])
    caps = sample_captions(labels, tiny_cfg, torch.Generator().manual_seed(0))
    named = [c for c in caps if "ida" in c or "idb" in c]
    assert "" in caps and len(named) > 100  # empty prompts for guidance; most captions name clusters
    tok = build_tokenizer()
    unk = tok.unk_token_id
    assert all(unk not in tok(c).input_ids for c in caps)
    assert all(f"ida{labels[i, 0]:02d}" in c or f"idb{labels[i, 1]:02d}" in c for i, c in enumerate(caps) if c in named)


def test_work_in_processes_comes_back_in_order_and_stops():
    jobs = [(2, i) for i in range(9)]
    assert list(in_workers(pow, jobs, 2)) == list(in_workers(pow, jobs, 1)) == [2**i for i in range(9)]
    got = []
    for r in in_workers(pow, jobs, 2, should_stop=lambda: len(got) >= 3):
        got.append(r)
    assert got == [1, 2, 4]


def test_descriptors_resume_from_the_chunks_done(tiny_cfg, tmp_path):
    from core.model.train_base import describe_all

    crops = np.zeros((5, 64, 64, 3), np.uint8) + np.arange(5, dtype=np.uint8)[:, None, None, None] * 40
    folder = tmp_path / "desc"
    first = []
    for e in describe_all(crops, folder, should_stop=lambda: len(first) >= 1, chunk=2):
        first.append(e)
    assert [e.step for e in first] == [2] and len(list(folder.glob("chunk_*.npy"))) == 1
    events, done = [], None
    gen = describe_all(crops, folder, chunk=2)
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        done = stop.value
    assert [e.step for e in events] == [4, 5]  # only the chunks missing were described
    assert done.shape == (5, 128) and np.isfinite(done).all()


def test_a_signal_stops_a_command_line_job_at_its_next_check():
    """``python -m core.model.train_base`` stops on Ctrl-C or SIGTERM through ``stop_on_signals``
    (its stages then keep their work: the UNet's state is saved at the stop)."""
    import os
    import signal

    from core.events import stop_on_signals

    before = signal.getsignal(signal.SIGUSR1)
    try:
        stop = stop_on_signals((signal.SIGUSR1,))
        assert not stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop()
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_learning_rate_warms_up_holds_and_decays_to_zero():
    cfg = BaseTrainConfig(unet_steps=100, warmup=10, unet_lr=1e-3, decay_from=60)
    lrs = [learning_rate(cfg, s) for s in range(cfg.unet_steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(lr == pytest.approx(1e-3) for lr in lrs[9:61])
    assert all(a > b for a, b in zip(lrs[60:], lrs[61:]))  # falls every step after decay_from
    assert lrs[-1] == pytest.approx(1e-3 / 40)  # the last step's rate, one step before 0
    constant = BaseTrainConfig(unet_steps=100, warmup=10)
    assert learning_rate(constant, 99) == constant.unet_lr
    with pytest.raises(ValueError, match="decay_from"):
        BaseTrainConfig(unet_steps=100, decay_from=100)
