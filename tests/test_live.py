"""core.finetune.live: the visitor's job yields what the Fine-tune tab shows, in order, and honours
its config (defense on what is shared, DP-SGD, cancel)."""

import pytest

from core.events import Done, LayerChanges, Preview, Progress, drain
from core.finetune.live import LiveConfig, live_finetune, shared_lora
from core.finetune.lora import FinetuneConfig
from tests.conftest import random_crops

TINY = FinetuneConfig(steps=4, batch=1, n_class=2, checkpoint_every=2, preview_n=1, preview_steps=2, seed=0)


def test_events_of_a_plain_run(tiny_pipe):
    floor = random_crops(2)
    events = list(live_finetune(tiny_pipe, random_crops(3), LiveConfig(TINY), attacker=None, floor_images=floor))
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("Progress") == 4 and kinds.count("LayerChanges") == 2 and kinds.count("Preview") == 2
    assert isinstance(events[-1], Done) and not events[-1].cancelled
    r = events[-1].result
    assert r.result.steps_done == 4 and r.utility.floor > 0 and r.utility_before_defense is None
    assert [e.step for e in events if isinstance(e, LayerChanges)] == [2, 4]
    assert r.raw_lora.keys() == r.result.lora.keys()


def test_defense_applies_to_what_is_shared(tiny_pipe):
    cfg = LiveConfig(TINY, defense="prune", strength=0.5)
    r = drain(live_finetune(tiny_pipe, random_crops(3), cfg, floor_images=random_crops(2)))
    assert all((r.result.lora[k] == shared_lora(r.raw_lora, cfg)[k]).all() for k in r.raw_lora)
    assert r.utility_before_defense is not None


def test_dp_run_reports_epsilon(tiny_pipe):
    events = list(
        live_finetune(tiny_pipe, random_crops(3), LiveConfig(TINY, dp_noise=1.0), floor_images=random_crops(2))
    )
    assert all("epsilon" in e.metrics for e in events if isinstance(e, Progress))
    assert events[-1].result.epsilon is not None and events[-1].result.epsilon > 0


def test_cancel_ends_with_a_cancelled_done(tiny_pipe):
    seen = []
    for ev in live_finetune(
        tiny_pipe, random_crops(3), LiveConfig(TINY), floor_images=random_crops(2), should_stop=lambda: len(seen) >= 2
    ):
        if isinstance(ev, Progress):
            seen.append(ev)
    assert isinstance(ev, Done) and ev.cancelled and ev.result is None


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(dp_noise=-1.0), "noise"),
        (dict(defense="nope", strength=1), "unknown defense"),
        (dict(defense="prune"), "needs a strength"),
        (dict(defense="prune", strength=2.0), "fraction"),
    ],
)
def test_bad_configs_say_why(kw, words):
    with pytest.raises(ValueError, match=words):
        LiveConfig(TINY, **kw)


def test_dp_with_text_encoder_is_refused():
    from dataclasses import replace

    with pytest.raises(ValueError, match="UNet LoRA only"):
        LiveConfig(replace(TINY, text_encoder=True), dp_noise=1.0)


def test_previews_are_the_loras_own_samples(tiny_pipe):
    events = list(live_finetune(tiny_pipe, random_crops(3), LiveConfig(TINY), floor_images=random_crops(2)))
    previews = [e for e in events if isinstance(e, Preview)]
    assert [p.step for p in previews] == [2, 4] and all(len(p.images) == 1 for p in previews)
