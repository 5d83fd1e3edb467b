"""Extrapolated sampling (FineXtract's guidance, also the attacker's sampling): w = 1 is the fine-tuned
model itself, w > 1 follows eps_base + w (eps_ft - eps_base) step by step."""

import numpy as np
import torch

from core.attack.baselines import extrapolate
from core.finetune.lora import encode_prompt, pipeline_with_lora
from core.model.pipeline import sample_images


def a_lora(pipe, scale=0.05, seed=0):
    """A random LoRA on every attention query/value projection of the tiny UNet."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in pipe.unet.named_modules():
        if name.endswith(("to_q", "to_v")):
            out[f"unet.{name}.lora_A.weight"] = torch.randn(2, m.in_features, generator=g) * scale
            out[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_features, 2, generator=g) * scale
    return out


def test_w_one_is_the_fine_tuned_model_sampling_as_the_pipeline_does(tiny_pipe):
    ft = pipeline_with_lora(tiny_pipe, a_lora(tiny_pipe))
    emb = encode_prompt(tiny_pipe, "a photo of a face")
    ours = extrapolate(tiny_pipe, ft, emb, 1.0, seeds=[0, 1], steps=4)
    theirs = sample_images(ft, n=2, seed=[0, 1], steps=4, prompt_embeds=emb.expand(2, -1, -1))
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(ours, theirs)) <= 2


def test_extrapolation_moves_away_from_the_base_and_w_zero_is_the_base(tiny_pipe):
    lora = a_lora(tiny_pipe, scale=0.2)
    ft = pipeline_with_lora(tiny_pipe, lora)
    emb = encode_prompt(tiny_pipe, "")
    base = np.stack(sample_images(tiny_pipe, n=2, seed=[0, 1], steps=4, prompt_embeds=emb.expand(2, -1, -1))).astype(
        float
    )
    w0, w1, w3 = (
        np.stack(extrapolate(tiny_pipe, ft, emb, w, seeds=[0, 1], steps=4)).astype(float) for w in (0.0, 1.0, 3.0)
    )
    assert np.abs(w0 - base).max() <= 2  # w = 0: the base model's own prediction at every step
    assert np.abs(w3 - base).mean() > np.abs(w1 - base).mean() > 0  # pushed further than the fine-tune alone
