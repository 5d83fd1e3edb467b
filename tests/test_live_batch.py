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
