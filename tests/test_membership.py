"""Membership inference (core.attack.membership) and its study's scoring and report (core.studies.membership),
on the tiny pipeline."""

import json
from dataclasses import asdict, replace

import numpy as np
import pytest

from core.attack.membership import (
    Calibration,
    MembershipConfig,
    auc,
    calibrate,
    load_calibration,
    membership_scores,
    photo_losses,
    roc_curve,
    scores_from_losses,
    threshold_at_fpr,
)
from core.events import drain, result_of
from core.finetune.lora import FinetuneConfig, finetune
from tests.conftest import random_crops

FAST = MembershipConfig(timesteps=(10, 25, 50, 100), noises=4)


def smooth(n, seed0=0, size=64):
    from PIL import Image

    return [
        np.asarray(Image.fromarray(c[:8, :8]).resize((size, size), Image.BICUBIC))
        for c in random_crops(n + seed0, size)[seed0:]
    ]


@pytest.fixture(scope="module")
def warm_pipe(tiny_pipe):
    """The tiny base after a short fine-tune on 10 pool photos (merged): it stands in for a pre-trained
    base, which already knows what such photos look like. From the random tiny base, a LoRA learns the
    kind of photo first, and every photo of that kind gains alike."""
    from core.finetune.lora import pipeline_with_lora

    cfg = FinetuneConfig(
        steps=150, rank=8, alpha=8, lr=1e-2, prior_weight=0.0, n_class=0, checkpoint_every=0, preview_n=0, seed=1
    )
    return pipeline_with_lora(tiny_pipe, drain(finetune(tiny_pipe, smooth(10, seed0=100), cfg)).lora)


@pytest.fixture(scope="module")
def memorised(warm_pipe):
    """A LoRA trained long enough on 3 photos to memorise them (300 steps, no class images):
    (lora, its photos, 3 other photos of the same kind)."""
    members, others = smooth(3), smooth(3, seed0=10)
    cfg = FinetuneConfig(steps=300, lr=1e-2, prior_weight=0.0, n_class=0, checkpoint_every=0, preview_n=0, seed=3)
    return drain(finetune(warm_pipe, members, cfg)).lora, members, others


def test_members_score_above_non_members_for_a_lora_that_memorised(warm_pipe, memorised):
    lora, members, others = memorised
    s_in, s_out = membership_scores(warm_pipe, lora, members, FAST), membership_scores(warm_pipe, lora, others, FAST)
    assert s_in.shape == (3,) and s_out.shape == (3,)
    assert s_in.min() > s_out.max() and auc(s_in, s_out) == 1.0


def test_the_base_model_scores_zero_and_scores_are_per_photo(tiny_pipe, memorised):
    lora, members = memorised[:2]
    base = photo_losses(tiny_pipe, tiny_pipe.unet, members, FAST)
    assert base.shape == (3, 2 * len(FAST.timesteps) * FAST.noises)  # photo and mirror image, every draw
    assert np.all(scores_from_losses(base, base) == 0)
    # a photo's losses use the same fixed draws whatever else is scored beside it
    alone = photo_losses(tiny_pipe, tiny_pipe.unet, members[1:2], FAST)
    assert np.allclose(alone[0], base[1], rtol=1e-4, atol=1e-7)
    again = membership_scores(tiny_pipe, lora, members, FAST, base_losses=base)
    assert np.allclose(again, membership_scores(tiny_pipe, lora, members, FAST), atol=1e-9)
    no_mirror = photo_losses(tiny_pipe, tiny_pipe.unet, members, replace(FAST, mirror=False))
    assert no_mirror.shape[1] == base.shape[1] // 2 and np.allclose(no_mirror, base[:, : no_mirror.shape[1]], rtol=1e-4)


def test_auc_roc_and_threshold():
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0 and auc([0, 1], [2, 3]) == 0.0 and auc([1, 1], [1, 1]) == 0.5
    assert auc([2, 0], [1]) == 0.5
    fpr, tpr = roc_curve([3, 4, 5], [0, 1, 2])
    assert (
        (fpr[0], tpr[0]) == (0.0, 0.0)
        and (fpr[-1], tpr[-1]) == (1.0, 1.0)
        and max(tpr[i] for i in range(4) if fpr[i] == 0) == 1.0
    )
    neg = np.arange(100.0)
    thr = threshold_at_fpr(neg, 0.05)
    assert np.mean(neg > thr) == pytest.approx(0.05, abs=0.011)
    with pytest.raises(ValueError, match="1.5"):
        threshold_at_fpr(neg, 1.5)
    with pytest.raises(ValueError, match="1000"):
        MembershipConfig(timesteps=(1000,))


def test_calibration_reads_only_for_its_own_base():
    cal = calibrate(np.array([1.0, 2.0, 3.0]), np.arange(0, 1, 0.01), np.array([0.0, 5.0]), 0.05, "abc", 80, 3, FAST)
    assert cal.above(2.0) and not cal.above(0.5) and cal.tpr == 1.0 and cal.fpr_other == 0.5
    report = {"calibration": json.loads(json.dumps(asdict(cal)))}
    got, why = load_calibration(report, "abc")
    assert isinstance(got, Calibration) and got.threshold == cal.threshold and why == ""
    assert load_calibration(report, "other")[0] is None and "another base model" in load_calibration(report, "other")[1]
    assert (
        load_calibration(None, "abc")[0] is None
        and "python -m core.studies.membership" in load_calibration(None, "abc")[1]
    )


# the study's scoring and report on fake people -------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored(tiny_pipe):
    from core.studies.membership import MembershipStudyConfig, People, score_people

    cfg = MembershipStudyConfig(timesteps=(200, 400), noises=2, n=2, n_calibration=2, n_others=2, steps=40)
    private, unseen, loras = [], [], []
    for i in range(3):
        photos = smooth(5, seed0=20 * i)
        private.append(photos[:3])
        unseen.append(photos[3:] if i < 2 else [])
        run = FinetuneConfig(steps=40, lr=1e-2, prior_weight=0.0, n_class=0, checkpoint_every=20, preview_n=0, seed=i)
        loras.append(
            {
                ev.step: ev.lora
                for ev in finetune(tiny_pipe, photos[:3], run)
                if hasattr(ev, "lora") and hasattr(ev, "step")
            }
        )
    people = People(["a", "b", "c"], private, unseen, loras)
    return cfg, people, result_of(score_people(tiny_pipe, people, cfg, [20, 40]))


def test_score_people_scores_members_unseen_and_others(scored):
    cfg, people, s = scored
    assert set(s) == {20, 40}
    for step in (20, 40):
        assert [len(x) for x in s[step]["members"]] == [3, 3, 3]
        assert [len(x) for x in s[step]["unseen"]] == [2, 2, 0]
        assert [len(x) for x in s[step]["others"]] == [2, 2, 2]


def test_the_report_reads_off_the_numbers(scored):
    from core.plots import membership_roc_plot
    from core.studies.membership import conclusion, summarize, to_markdown

    cfg, people, s = scored
    rows = {str(k): summarize(s[k], 0.0) for k in (20, 40)}
    row = rows["40"]
    assert row["auc_unseen"]["people"] == 2 and row["auc_others"]["people"] == 3
    assert 0 <= row["auc_unseen"]["ci"][0] <= row["auc_unseen"]["auc"] <= row["auc_unseen"]["ci"][1] <= 1
    assert row["tpr"]["photos"] == 9 and row["fpr_unseen"]["photos"] == 4 and row["fpr_others"]["photos"] == 6
    cal = calibrate(np.ones(3), np.zeros(4), np.zeros(2), 0.05, "tiny", 40, 2, cfg.score_config())
    r = dict(
        calibration=asdict(cal),
        calibration_auc_unseen=row["auc_unseen"],
        n_victims=3,
        n_with_unseen=2,
        rows=rows,
        steps=[20, 40],
        base="tiny",
        study_config=asdict(cfg),
    )
    text = conclusion(r)
    assert f"{row['auc_unseen']['auc']:.3f}" in text and "after 20 steps" in text
    md = to_markdown(r)
    assert "| 40 steps (the default) |" in md and "**Conclusion.**" in md
    json.dumps(r, allow_nan=False)
    fig = membership_roc_plot(r)
    assert len(fig.data) == 4


def test_a_rerun_scores_from_the_cache(tiny_pipe, scored, monkeypatch):
    import core.studies.membership as sm

    cfg, people, s = scored

    def boom(*a, **k):
        raise AssertionError("rescored")

    monkeypatch.setattr(sm, "photo_losses", boom)
    again = result_of(sm.score_people(tiny_pipe, people, cfg, [20, 40]))
    assert all(np.array_equal(a, b) for st in (20, 40) for kind in s[st] for a, b in zip(again[st][kind], s[st][kind]))
