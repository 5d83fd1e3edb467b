"""core.finetune.live_batch: the CPU path's scratch UNet holds exactly one LoRA at a time."""

import torch

from core.finetune.batch import initial_adapters, peft_key
from core.finetune.live_batch import Sampler
from core.finetune.lora import FinetuneConfig, pipeline_with_lora


def random_lora(pipe, seed: int) -> dict:
    torch.manual_seed(seed)
    params = initial_adapters(pipe, FinetuneConfig(), [seed])
    return {peft_key(n): v[0] + (0.1 * torch.randn_like(v[0]) if "lora_B" in n else 0) for n, v in params.items()}


def test_each_merge_equals_a_fresh_copy_and_leaves_the_base_alone(tiny_pipe):
    base = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
    sampler = Sampler(tiny_pipe)
    for seed, alpha in ((1, 4.0), (2, 8.0), (1, 4.0)):
        lora = random_lora(tiny_pipe, seed)
        got = dict(sampler.merged(lora, alpha).unet.named_parameters())
        want = dict(pipeline_with_lora(tiny_pipe, lora, alpha).unet.named_parameters())
        assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)
    assert all(torch.equal(p, base[n]) for n, p in tiny_pipe.unet.named_parameters())


def test_checkpoints_of_two_recipes_are_stacked_apart():
    from dataclasses import replace

    from core.finetune.live import LiveConfig
    from core.finetune.live_batch import Due, Visit, by_recipe

    def due(rank):
        cfg = LiveConfig(replace(FinetuneConfig(), rank=rank, alpha=float(rank)))
        return Due(Visit([], cfg, None), 20, {}, False)

    assert list(by_recipe([due(4), due(8), due(4)]).values()) == [[0, 2], [1]]


def test_the_stacked_path_draws_what_the_merged_path_draws(tiny_pipe):
    """The GPU path (all LoRAs in one vmapped forward) run on the CPU against the CPU path."""
    import numpy as np

    from core.finetune.live import LiveConfig
    from core.finetune.live_batch import Due, Visit, checkpoint_images

    cfg = LiveConfig(FinetuneConfig(preview_n=2, preview_steps=3, trigger="sks"))
    due = [Due(Visit([], cfg, None), 20, random_lora(tiny_pipe, s), False) for s in (1, 2)]
    drawn = {}
    for merge in (True, False):
        sampler = Sampler(tiny_pipe)
        sampler.merge = merge
        drawn[merge] = {k: ev.images for k, ev in checkpoint_images(sampler, None, due, 2)}
    assert drawn[True].keys() == drawn[False].keys() == {0, 1}
    for k in (0, 1):
        a, b = (np.stack(drawn[m][k]).astype(int) for m in (True, False))
        assert np.abs(a - b).mean() < 2, k
    assert np.abs(np.stack(drawn[True][0]).astype(int) - np.stack(drawn[True][1]).astype(int)).mean() > 0


def test_a_last_checkpoint_drawn_side_by_side_gives_the_same_events(tiny_pipe):
    """A visitor alone: their last reconstruction here and their previews in a second thread (the
    hub's ``split_last``) give the events of the one-thread path, in the same order."""
    import numpy as np

    from core.attack.attacker import Attacker, config_for
    from core.faces.utility import describe_set
    from core.finetune.live import LiveConfig
    from core.finetune.live_batch import Due, Visit, checkpoint_images
    from core.finetune.lora import encode_prompt
    from core.model.prompts import CLASS_PROMPT
    from tests.test_cloak import face_like

    lora = random_lora(tiny_pipe, 3)
    attacker = Attacker(
        config_for(tiny_pipe, lora, rank=4, alpha=4.0), class_embedding=encode_prompt(tiny_pipe, CLASS_PROMPT)[0]
    ).eval()
    cfg = LiveConfig(FinetuneConfig(trigger="sks"))
    photos = face_like(3, 64)
    drawn = {}
    for helper in (None, Sampler(tiny_pipe)):
        due = [Due(Visit(photos, cfg, describe_set(face_like(2, 64))), 80, lora, True)]
        drawn[helper is None] = list(checkpoint_images(Sampler(tiny_pipe), attacker, due, 2, helper=helper))
    one, two = drawn[True], drawn[False]
    assert [type(ev).__name__ for _, ev in one] == [type(ev).__name__ for _, ev in two] == ["Reconstruction", "Preview"]
    for (_, a), (_, b) in zip(one, two):
        assert np.abs(np.stack(a.images).astype(int) - np.stack(b.images).astype(int)).mean() < 1
        assert (a.distance is None) == (b.distance is None)
