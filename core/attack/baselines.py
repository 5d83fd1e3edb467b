"""Reference attacks scored with the same protocol as the trained attacker (docs/EVAL).

- floor: the base model with the class prompt (a random person of the right kind; no LoRA at all);
- naive: the shared LoRA sampled with the class prompt, or with the empty prompt (what anyone who
  downloads the file can do without knowing the trigger);
- ceiling: the LoRA sampled with its true trigger (the visitor's own use; the attacker lacks it);
- FineXtract-style (Wu et al. 2024), weights only, no training: extrapolate from the base model's
  noise prediction toward the fine-tuned one's, eps = eps_base + w (eps_ft - eps_base), which
  samples the fine-tuning distribution more sharply than the fine-tuned model alone. The paper then
  clusters many samples; here 4 samples are scored like every other row (*choice*, documented).
"""

from __future__ import annotations

import numpy as np
import torch

from core.finetune.lora import encode_prompt, pipeline_with_lora
from core.model.pipeline import sample_images
from core.model.prompts import CLASS_PROMPT, instance_prompt
from core.model.sampling import sample_with

SEEDS = (0, 1, 2, 3)
FINEXTRACT_W = 3.0  # extrapolation weight (1 = the fine-tuned model itself)


def floor(pipe, seeds=SEEDS, steps: int = 25):
    return sample_images(pipe, CLASS_PROMPT, seed=list(seeds), steps=steps)


def naive(pipe, lora: dict, prompt: str = CLASS_PROMPT, seeds=SEEDS, steps: int = 25, model=None):
    return sample_images(model or pipeline_with_lora(pipe, lora), prompt, seed=list(seeds), steps=steps)


def ceiling(pipe, lora: dict, trigger: str, seeds=SEEDS, steps: int = 25, model=None):
    return sample_images(
        model or pipeline_with_lora(pipe, lora), instance_prompt(trigger), seed=list(seeds), steps=steps
    )


def finextract(
    pipe, lora: dict, w: float = FINEXTRACT_W, prompt: str = CLASS_PROMPT, seeds=SEEDS, steps: int = 25, model=None
) -> list[np.ndarray]:
    """FineXtract-style extrapolated sampling with the pipeline's own scheduler (``prompt`` for both models,
    each encoded by its own text encoder: a LoRA with text-encoder layers changes the fine-tuned side's)."""
    ft = model or pipeline_with_lora(pipe, lora)
    with torch.no_grad():
        emb = encode_prompt(pipe, prompt)
        emb_ft = encode_prompt(ft, prompt) if ft.text_encoder is not pipe.text_encoder else None
    return extrapolate(pipe, ft, emb, w, seeds, steps, emb_ft=emb_ft)


@torch.no_grad()
def extrapolate(
    pipe, ft, emb: torch.Tensor, w: float, seeds=SEEDS, steps: int = 25, emb_ft: torch.Tensor | None = None
) -> list[np.ndarray]:
    """Sample with eps = eps_base + w (eps_ft - eps_base), both models conditioned on the prompt
    embedding ``emb`` (1 x L x D, or one per seed; ``emb_ft``: the fine-tuned side's own, when its text
    encoder differs): w = 1 is the fine-tuned model ``ft`` itself, w > 1 pushes each step further away
    from what the base model would draw, toward what the fine-tune added."""
    n = len(list(seeds))
    emb = emb.to(pipe.device, pipe.unet.dtype).expand(n, -1, -1)
    emb_ft = emb if emb_ft is None else emb_ft.to(pipe.device, pipe.unet.dtype).expand(n, -1, -1)

    def predict(x, t):
        f = ft.unet(x, t, emb_ft).sample
        if w == 1:
            return f
        b = pipe.unet(x, t, emb).sample
        return b + w * (f - b)

    return sample_with(pipe, predict, seeds, steps)
