"""core.finetune.batch: runs in one stacked forward train exactly as they would alone, and a run that
leaves (cancel, disconnect) or joins late changes nothing for the others."""

from dataclasses import replace

import pytest
import torch

from core.events import drain
from core.finetune.batch import LoRABatch
from core.finetune.lora import FinetuneConfig, finetune
from tests.conftest import random_crops

TINY = FinetuneConfig(steps=4, batch=1, n_class=2, checkpoint_every=0, preview_n=0, seed=0)


def close(a: dict, b: dict, tol=5e-4) -> bool:
    """Equal up to float noise. The batch's vmapped forward sums in another order than a run alone,
    and AdamW turns that noise in a near-zero gradient component into a step of up to the learning
    rate: ``tol`` is 4 % of the largest move 4 steps at lr 3e-3 can make; a run that saw another's
    photos or steps moves by the whole of it."""
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=tol, rtol=tol) for k in a)


def unet_part(lora: dict) -> dict:
    return {k: v for k, v in lora.items() if k.startswith("unet.")}


def run_batch(pipe, photo_sets, steps=4, leave=None, join=None):
    """Train the runs of ``photo_sets`` ({k: crops} or a list) together, run k with seed 10 + k;
    ``leave=(k, step)`` removes run k after that step; ``join=(k, step)`` adds run k only after that
    step. Returns each remaining run's final LoRA by k."""
    if not isinstance(photo_sets, dict):
        photo_sets = dict(enumerate(photo_sets))
    batch = LoRABatch(pipe, TINY)
    runs = {}
    for k, crops in photo_sets.items():
        if not join or join[0] != k:
            runs[k] = batch.add(k, crops, replace(TINY, seed=10 + k, steps=steps))
    for s in range(1, 2 * steps + 1):
        if join and s - 1 == join[1]:
            runs[join[0]] = batch.add(join[0], photo_sets[join[0]], replace(TINY, seed=10 + join[0], steps=steps))
        batch.step()
        if leave and s == leave[1]:
            batch.remove(runs.pop(leave[0]))
    return {k: r.lora() for k, r in runs.items()}


@pytest.fixture(scope="module")
def photos():
    return [random_crops(3 + i, 64)[i:] for i in range(3)]


def test_each_run_trains_as_it_would_alone(tiny_pipe, photos):
    together = run_batch(tiny_pipe, photos)
    for k, crops in enumerate(photos):
        alone = drain(finetune(tiny_pipe, crops, replace(TINY, seed=10 + k)))
        assert close(together[k], unet_part(alone.lora)), k


def test_a_run_that_leaves_changes_nothing_for_the_others(tiny_pipe, photos):
    with_b = run_batch(tiny_pipe, photos, leave=(1, 2))
    without_b = run_batch(tiny_pipe, {0: photos[0], 2: photos[2]})
    assert 1 not in with_b
    assert close(with_b[0], without_b[0]) and close(with_b[2], without_b[2])


def test_a_run_that_joins_late_trains_as_it_would_alone(tiny_pipe, photos):
    late = run_batch(tiny_pipe, photos, join=(2, 2))
    alone = drain(finetune(tiny_pipe, photos[2], replace(TINY, seed=12)))
    assert close(late[2], unet_part(alone.lora))


def test_only_compatible_recipes_share_a_batch(tiny_pipe):
    batch = LoRABatch(tiny_pipe, TINY)
    assert batch.accepts(replace(TINY, seed=5, steps=9, trigger="zorp"))
    assert not batch.accepts(replace(TINY, rank=8)) and not batch.accepts(replace(TINY, lr=1e-4))
    assert not batch.accepts(replace(TINY, text_encoder=True))
    with pytest.raises(ValueError, match="cannot join"):
        batch.add("x", random_crops(3, 64), replace(TINY, rank=8))


def test_a_compiled_stack_trains_as_the_eager_one_and_is_compiled_once(tiny_pipe, photos):
    """AdapterStack.compile: the compiled step gives the eager LoRA (float tolerance); later batches of
    the recipe reuse it without compiling again, and batches of several LoRAs run eagerly. (The capture
    and autograd graphs of torch.compile, without inductor's code generation, which takes minutes:
    bench/compile_once.py runs that.)"""
    from torch._dynamo.utils import counters

    from core.finetune.batch import AdapterStack

    stack = AdapterStack(tiny_pipe, TINY)
    assert stack.compile(photos[0], backend="aot_eager") and stack.compiled is not None and stack.compile_seconds > 0
    frames = counters["stats"]["unique_graphs"]

    def train(stack_or_none, sets):
        batch = LoRABatch(tiny_pipe, TINY, stack_or_none.forward if stack_or_none else None)
        runs = [batch.add(k, crops, replace(TINY, seed=10 + k, steps=3)) for k, crops in enumerate(sets)]
        for _ in range(3):
            batch.step()
        return [r.lora() for r in runs]

    for sets in (photos[:1], photos, photos[1:2]):  # one LoRA (compiled), three (eager), one
        for got, want in zip(train(stack, sets), train(None, sets)):
            assert close(got, want, tol=1e-4)
    assert counters["stats"]["unique_graphs"] == frames  # nothing was compiled again


def test_initial_adapters_are_peft_s_own_initialisation_of_the_whole_unet(tiny_pipe):
    """The adapters drawn on a skeleton of the target layers are those peft draws into a full copy of
    the UNet with the same seed (what ``finetune`` trains from), bit for bit."""
    import copy

    from core.finetune.batch import initial_adapters
    from core.finetune.lora import lora_config

    cfg = replace(TINY, rank=2)
    stacked = initial_adapters(tiny_pipe, cfg, [3, 4])
    for k, seed in enumerate((3, 4)):
        torch.manual_seed(seed)
        whole = copy.deepcopy(tiny_pipe.unet)
        whole.add_adapter(lora_config(cfg))
        expected = {n: p for n, p in whole.named_parameters() if "lora_" in n}
        assert list(expected) == list(stacked)
        assert all(torch.equal(expected[n], stacked[n][k]) for n in expected)
    a = next(n for n in stacked if "lora_A" in n)
    assert not torch.equal(stacked[a][0], stacked[a][1])  # each seed its own draw
