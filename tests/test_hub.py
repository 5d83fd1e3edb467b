"""core.finetune.hub: visitors trained together each get their own events and LoRA, equal to
training alone; a visitor who leaves changes nothing for the others; DP-SGD trains alone."""

import threading
from dataclasses import replace

import pytest
import torch

from core.events import Done, Preview, Progress, Reconstruction, drain
from core.finetune.hub import Failed, HubConfig, Training, TrainingHub
from core.finetune.live import LiveConfig
from core.finetune.lora import FinetuneConfig, finetune
from tests.conftest import random_crops

TINY = FinetuneConfig(steps=4, batch=1, n_class=2, checkpoint_every=2, preview_n=1, preview_steps=2, seed=0)


@pytest.fixture(scope="module")
def hub(tiny_pipe):
    return TrainingHub(tiny_pipe, attacker=None, floor_images=random_crops(2), cfg=HubConfig(max_batch=4))


def visit(hub, k, cfg=None, stop_after=None, out=None):
    """Run one visitor's stream in a thread; its events land in out[k]."""
    seen = []
    cfg = cfg or LiveConfig(replace(TINY, seed=20 + k))

    def go():
        try:
            for ev in hub.submit(random_crops(3 + k)[k:], cfg):
                seen.append(ev)
                if stop_after and isinstance(ev, Progress) and ev.step >= stop_after:
                    break  # the visitor leaves: the generator is closed
        except Failed as e:
            seen.append(e)
        out[k] = seen

    th = threading.Thread(target=go)
    th.start()
    return th


def test_visitors_get_their_own_stream_and_lora(hub, tiny_pipe):
    out = {}
    threads = [visit(hub, k, out=out) for k in range(3)]
    for th in threads:
        th.join(600)
    for k in range(3):
        evs = out[k]
        done = evs[-1]
        assert isinstance(done, Done) and not done.cancelled
        assert [e.step for e in evs if isinstance(e, Progress)] == [1, 2, 3, 4]
        assert [e.step for e in evs if isinstance(e, Preview)] == [2, 4]
        assert any(isinstance(e, Training) for e in evs)
        alone = drain(finetune(tiny_pipe, random_crops(3 + k)[k:], replace(TINY, seed=20 + k, preview_n=0)))
        mine = done.result.result.lora
        assert all(torch.allclose(mine[n], alone.lora[n], atol=2e-4) for n in mine)
        assert done.result.utility.distance > 0 and len(done.result.utility.images) == 4


def test_a_visitor_who_leaves_changes_nothing_for_the_others(hub):
    out = {}
    threads = [visit(hub, 0, out=out), visit(hub, 1, out=out, stop_after=1), visit(hub, 2, out=out)]
    for th in threads:
        th.join(600)
    assert not isinstance(out[1][-1], Done)  # it left after step 1
    for k in (0, 2):
        assert isinstance(out[k][-1], Done) and not out[k][-1].cancelled


def test_dp_trains_alone_and_says_so(hub):
    out = {}
    visit(hub, 0, cfg=LiveConfig(replace(TINY, seed=1), dp_noise=1.0), out=out).join(600)
    training = [e for e in out[0] if isinstance(e, Training)]
    assert training and "DP-SGD" in training[0].alone_because
    assert isinstance(out[0][-1], Done) and out[0][-1].result.epsilon is not None


def test_bad_photos_fail_that_visitor_only(hub):
    out = {}
    bad = LiveConfig(replace(TINY, seed=3))
    seen = []

    def go():
        try:
            for ev in hub.submit([random_crops(1, 32)[0]] * 3, bad):  # 32 px photos for a 64 px model
                seen.append(ev)
        except Failed as e:
            seen.append(e)

    th = threading.Thread(target=go)
    th.start()
    ok = visit(hub, 1, out=out)
    th.join(600)
    ok.join(600)
    assert isinstance(seen[-1], Failed) and "px" in str(seen[-1])
    assert isinstance(out[1][-1], Done) and not out[1][-1].cancelled


def test_no_attacker_means_no_reconstructions(hub):
    out = {}
    visit(hub, 2, out=out).join(600)
    assert not [e for e in out[2] if isinstance(e, Reconstruction)]


def test_live_work_between_steps_gives_the_same_lora_and_events(tiny_pipe):
    hub = TrainingHub(tiny_pipe, attacker=None, floor_images=random_crops(2), cfg=HubConfig(live_thread=False))
    out = {}
    visit(hub, 1, out=out).join(600)
    evs, done = out[1], out[1][-1]
    assert isinstance(done, Done) and not done.cancelled
    assert [e.step for e in evs if isinstance(e, Preview)] == [2, 4]
    alone = drain(finetune(tiny_pipe, random_crops(4)[1:], replace(TINY, seed=21, preview_n=0)))
    mine = done.result.result.lora
    assert all(torch.allclose(mine[n], alone.lora[n], atol=2e-4) for n in mine)


def test_an_idle_trainer_draws_waiting_checkpoints_in_each_visits_order(tiny_pipe):
    """With a slow live thread the checkpoints pile up; once nobody trains, the trainer draws them
    too, and each visitor still gets every checkpoint, in step order, then their score."""
    import time

    hub = TrainingHub(tiny_pipe, attacker=None, floor_images=random_crops(2), cfg=HubConfig(max_batch=4))
    draw = hub._draw

    def slow_draw(sampler, jobs, helper=None):
        if threading.current_thread() is hub.live_thread:
            time.sleep(0.5)
        return draw(sampler, jobs, helper)

    hub._draw = slow_draw
    out = {}
    cfg = replace(TINY, checkpoint_every=1)
    threads = [visit(hub, k, cfg=LiveConfig(replace(cfg, seed=20 + k)), out=out) for k in range(3)]
    for th in threads:
        th.join(600)
    assert hub.helped > 0
    for k in range(3):
        evs = out[k]
        assert isinstance(evs[-1], Done) and not evs[-1].cancelled
        assert [e.step for e in evs if isinstance(e, Preview)] == [1, 2, 3, 4]


def test_an_attacker_that_cannot_read_the_lora_says_so_once_and_training_goes_on(base_engine):
    from core.finetune.live import AttackUnavailable

    attacker, why = base_engine.attacker()
    assert attacker is not None, why
    size = base_engine.image_size
    hub = TrainingHub(base_engine.pipe, attacker, random_crops(2, size), HubConfig(max_batch=2))
    rank = attacker.cfg.rank * 2  # a recipe the attacker was not trained on
    cfg = LiveConfig(replace(TINY, rank=rank, alpha=float(rank)))
    evs = list(hub.submit(random_crops(3, size), cfg))
    told = [e for e in evs if isinstance(e, AttackUnavailable)]
    assert len(told) == 1 and "rank" in told[0].reason
    assert not [e for e in evs if isinstance(e, Reconstruction)]
    assert isinstance(evs[-1], Done) and not evs[-1].cancelled


def test_a_compiled_hub_trains_the_same_lora_and_keeps_one_stack(tiny_pipe):
    """HubConfig.compile: the default recipe's step is compiled in the background (here with the
    "aot_eager" backend: the same graphs without inductor's minutes of code generation); a visitor
    after it trains on the compiled step and gets the LoRA of a fine-tune alone; another recipe gets
    a stack of its own that is not kept."""
    import time

    hub = TrainingHub(
        tiny_pipe,
        attacker=None,
        floor_images=random_crops(2),
        cfg=HubConfig(compile=True, compile_backend="aot_eager"),
        default_recipe=TINY,
    )
    deadline = time.monotonic() + 500
    while hub.compile_state() == "compiling" and time.monotonic() < deadline:
        time.sleep(1)
    assert hub.compile_state() == "ready"
    out = {}
    visit(hub, 1, out=out).join(600)
    done = out[1][-1]
    assert isinstance(done, Done) and not done.cancelled
    alone = drain(finetune(tiny_pipe, random_crops(4)[1:], replace(TINY, seed=21, preview_n=0)))
    mine = done.result.result.lora
    assert all(torch.allclose(mine[n], alone.lora[n], atol=2e-4) for n in mine)
    (stack,) = hub.stacks.values()
    assert hub.batch.forward == stack.forward and stack.compiled is not None
    assert hub.stack(replace(TINY, rank=2)) is not hub.stack(replace(TINY, rank=2)) and len(hub.stacks) == 1
