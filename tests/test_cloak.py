"""Photo cloaking (core.defenses.cloak) and purification (core.defenses.purify) on the tiny pipeline:
the perturbation keeps its budget, raises the surrogate's loss, stops when asked; purification
changes the photo."""

from dataclasses import replace

import numpy as np
import pytest

from core.defenses.cloak import (
    CloakConfig,
    Protected,
    cloak_photos,
    fixed_loss,
    protect_photos,
    psnr,
    ssim,
    within_budget,
)
from core.defenses.purify import PURIFIERS, PurifyConfig, purify
from core.events import Done, Message, Progress, drain
from tests.conftest import random_crops

FAST = CloakConfig(budget=8, steps=4, surrogate_every=2, surrogate_steps=2)


def face_like(n, size=64):
    """Smooth photos (random low-frequency colour fields), closer to faces than white noise."""
    from PIL import Image

    return [np.asarray(Image.fromarray(c[:8, :8]).resize((size, size), Image.BICUBIC)) for c in random_crops(n, size)]


@pytest.fixture(scope="module")
def photos():
    return face_like(3)


@pytest.mark.parametrize("surrogate, budget", [("lora", 8), ("base", 4), ("base", 2.5)])
def test_the_perturbation_stays_within_its_budget(tiny_pipe, photos, surrogate, budget):
    cfg = replace(FAST, surrogate=surrogate, budget=budget)
    events = list(cloak_photos(tiny_pipe, photos, cfg))
    assert [e.step for e in events if isinstance(e, Progress)] == list(range(1, cfg.steps + 1))
    res = events[-1].result
    assert isinstance(events[-1], Done) and not events[-1].cancelled and res.steps_done == cfg.steps
    for c, o in zip(res.cloaked, photos):
        assert c.dtype == np.uint8 and c.shape == o.shape
        moved = np.abs(c.astype(int) - o.astype(int))
        assert moved.max() <= budget and moved.max() >= 1  # within the budget, and not a no-op
    assert all(np.isfinite(p) and p > 20 for p in res.psnr) and all(0 < s < 1 for s in res.ssim)


@pytest.mark.parametrize("surrogate", ["base", "lora"])
def test_a_cloaked_photo_raises_the_surrogates_loss(tiny_pipe, photos, surrogate):
    from core.finetune.lora import encode_prompt

    res = drain(cloak_photos(tiny_pipe, photos, replace(FAST, surrogate=surrogate, budget=16, steps=6)))
    assert res.loss_cloaked > res.loss_clean
    # also on draws the cloak never saw, against the base model itself
    emb = encode_prompt(tiny_pipe, "a photo of a face")
    assert fixed_loss(tiny_pipe, tiny_pipe.unet, res.cloaked, emb, seed=99) > fixed_loss(
        tiny_pipe, tiny_pipe.unet, photos, emb, seed=99
    )


def test_cloaking_is_repeatable_and_leaves_the_base_alone(tiny_pipe, photos):
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    a, b = drain(cloak_photos(tiny_pipe, photos, FAST)), drain(cloak_photos(tiny_pipe, photos, FAST))
    assert all(np.array_equal(x, y) for x, y in zip(a.cloaked, b.cloaked))
    c = drain(cloak_photos(tiny_pipe, photos, replace(FAST, seed=1)))
    assert any(not np.array_equal(x, y) for x, y in zip(a.cloaked, c.cloaked))
    after = tiny_pipe.unet.state_dict()
    assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())


def test_cloaking_stops_when_asked(tiny_pipe, photos):
    seen = []
    stop = lambda: len(seen) >= 2
    events = []
    for ev in cloak_photos(tiny_pipe, photos, replace(FAST, steps=8), should_stop=stop):
        events.append(ev)
        if isinstance(ev, Progress):
            seen.append(ev.step)
    last = events[-1]
    assert isinstance(last, Done) and last.cancelled and last.result.steps_done == 2
    assert all(np.abs(c.astype(int) - o.astype(int)).max() <= FAST.budget for c, o in zip(last.result.cloaked, photos))


def test_bad_settings_and_photos_are_refused_with_the_value(tiny_pipe):
    for kw, text in [
        (dict(budget=0), "0"),
        (dict(budget=300), "300"),
        (dict(steps=0), "0"),
        (dict(surrogate="vae"), "'vae'"),
        (dict(surrogate_lr=2.0), "2.0"),
        (dict(step_size=-1.0), "-1.0"),
    ]:
        with pytest.raises(ValueError, match=text):
            CloakConfig(**kw)
    with pytest.raises(ValueError, match="equal-size"):
        drain(cloak_photos(tiny_pipe, [np.zeros((64, 64, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)], FAST))
    assert CloakConfig(budget=8, steps=10).alpha == pytest.approx(2.0)  # Madry's 2.5 * budget / steps


def test_within_budget_clips_rounding_and_the_pixel_range():
    o = np.array([[[0, 128, 255]]], np.uint8)
    far = np.array([[[40, 100, 200]]], np.uint8)
    assert within_budget([o], [far], 8.7)[0].tolist() == [[[8, 120, 247]]]


def test_psnr_and_ssim():
    a = face_like(1)[0]
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    b = np.clip(a.astype(int) + 4, 0, 255).astype(np.uint8)
    mse = np.mean((b.astype(float) - a) ** 2)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / mse))
    rng = np.random.default_rng(0)
    noisy = [np.clip(a + rng.normal(0, s, a.shape), 0, 255).astype(np.uint8) for s in (2, 8, 32)]
    q = [ssim(a, x) for x in noisy]
    assert q[0] > q[1] > q[2] and ssim(a, noisy[1]) == pytest.approx(ssim(noisy[1], a))
    assert [psnr(a, x) for x in noisy] == sorted([psnr(a, x) for x in noisy], reverse=True)


# purification ------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", PURIFIERS)
def test_each_purification_step_changes_the_photo(photos, step):
    out = purify(photos, PurifyConfig(chain=(step,)))
    for o, p in zip(photos, out):
        assert p.shape == o.shape and p.dtype == np.uint8
        assert not np.array_equal(o, p)
    assert all(np.array_equal(x, y) for x, y in zip(out, purify(photos, PurifyConfig(chain=(step,)))))  # repeatable


def test_purification_of_a_cloaked_photo_undoes_part_of_the_cloak(tiny_pipe, photos):
    res = drain(cloak_photos(tiny_pipe, photos, replace(FAST, budget=16)))
    cleaned = purify(res.cloaked)
    assert all(not np.array_equal(c, p) for c, p in zip(res.cloaked, cleaned))
    # the cloak's high-frequency pattern is what down-up resizing and JPEG remove first
    resid = lambda x, o: np.abs(x.astype(float) - o.astype(float))
    assert np.mean(
        [resid(p, o).mean() for p, o in zip(purify(res.cloaked, PurifyConfig(chain=("resize",))), photos)]
    ) < np.mean([resid(c, o).mean() for c, o in zip(res.cloaked, photos)])


def test_purify_config_is_validated_and_said_in_words():
    for kw, text in [
        (dict(chain=("jpeg", "sharpen")), "sharpen"),
        (dict(jpeg_quality=0), "0"),
        (dict(resize_factor=1.5), "1.5"),
        (dict(noise_std=-1.0), "-1.0"),
    ]:
        with pytest.raises(ValueError, match=text):
            PurifyConfig(**kw)
    assert "JPEG quality 75" in PurifyConfig().words() and PurifyConfig(chain=()).words() == "nothing"


def test_protect_photos_cloaks_then_purifies(tiny_pipe, photos):
    events = list(protect_photos(tiny_pipe, photos, FAST, PurifyConfig()))
    assert any(isinstance(e, Message) and "purified" in e.text for e in events)
    prot = events[-1].result
    assert isinstance(prot, Protected) and prot.photos is prot.purified and len(prot.photos) == len(photos)
    plain = drain(protect_photos(tiny_pipe, photos, FAST))
    assert plain.purified is None and plain.photos is plain.cloak.cloaked
    stopped = list(protect_photos(tiny_pipe, photos, FAST, PurifyConfig(), should_stop=lambda: True))
    assert isinstance(stopped[-1], Done) and stopped[-1].cancelled and stopped[-1].result is None


def test_a_cloak_on_two_cores_gives_the_same_photos(tiny_pipe, photos):
    """``protect_photos(cores=2)`` computes in a thread of its own: the same cloak, repeatable."""
    here = drain(protect_photos(tiny_pipe, photos, FAST, cores=1))
    there = drain(protect_photos(tiny_pipe, photos, FAST, cores=2))
    # the same up to float rounding (2 threads sum in another order; a near-zero gradient's sign may flip)
    assert all(np.abs(a.astype(int) - b.astype(int)).mean() < 0.5 for a, b in zip(here.photos, there.photos))
    assert all(np.abs(c.astype(int) - o.astype(int)).max() <= FAST.budget for c, o in zip(there.photos, photos))
