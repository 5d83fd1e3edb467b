"""core.model.sampling: the shared loop draws what the pipeline draws, and K LoRAs stacked draw what
each LoRA draws alone."""

import numpy as np
import torch

from core.finetune.batch import adapter_unet
from core.finetune.lora import FinetuneConfig, encode_prompt, pipeline_with_lora
from core.model.pipeline import initial_latents, sample_images
from core.model.sampling import decode, denoise, sample_with, stacked


def test_plain_unet_draws_what_the_pipeline_draws(tiny_pipe):
    emb = encode_prompt(tiny_pipe, "a photo of a face")
    mine = sample_with(tiny_pipe, lambda x, t: tiny_pipe.unet(x, t, emb.expand(len(x), -1, -1)).sample, [3, 4], 5)
    theirs = sample_images(tiny_pipe, "a photo of a face", seed=[3, 4], steps=5)
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(mine, theirs))


def test_stacked_loras_draw_what_each_draws_alone(tiny_pipe):
    from torch.func import functional_call, vmap

    cfg = FinetuneConfig(rank=2, alpha=2.0)
    unet = adapter_unet(tiny_pipe, cfg)
    names = [n for n, _ in unet.named_parameters() if "lora_" in n]
    g = torch.Generator().manual_seed(0)
    loras = [
        {n: 0.2 * torch.randn(dict(unet.named_parameters())[n].shape, generator=g) for n in names} for _ in range(2)
    ]
    params = {n: torch.stack([lo[n] for lo in loras]) for n in names}
    forward = vmap(lambda p, x, t, e: functional_call(unet, p, (x, t, e)).sample)
    embs = torch.cat([encode_prompt(tiny_pipe, "a photo of zorp face"), encode_prompt(tiny_pipe, "a photo of a face")])
    lat = initial_latents(tiny_pipe, [0, 1, 0, 1])
    together = decode(tiny_pipe, denoise(tiny_pipe, stacked(forward, params, embs, 2), lat, 4))
    for k, prompt in enumerate(("a photo of zorp face", "a photo of a face")):
        mem = {"unet." + n.replace(".default", ""): v for n, v in loras[k].items()}
        alone = sample_images(pipeline_with_lora(tiny_pipe, mem, cfg.alpha), prompt, seed=[0, 1], steps=4)
        assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 2 for a, b in zip(together[2 * k : 2 * k + 2], alone))
