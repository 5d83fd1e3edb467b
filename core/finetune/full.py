"""A plain full fine-tune of the UNet on a person's photos (the busy/lazy layers' comparison with
the LoRA, Liu et al.): same DreamBooth recipe, every UNet weight trained."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from core.events import Done, Message, Progress, never
from core.layers.change import base_state, full_layer_change

FULL_LR = 5e-5  # learning rate of the comparison full fine-tune (AdamW, no weight decay)


@dataclass
class FullFinetuneResult:
    state: dict  # the fine-tuned UNet's state dict, CPU float32
    trigger: str
    losses: list
    seconds: float
    steps_done: int
    trajectory: dict = field(default_factory=dict)  # {step: list[LayerChange]} at each checkpoint


def full_finetune(
    pipe,
    crops,
    steps: int = 80,
    lr: float = FULL_LR,
    seed: int = 0,
    batch: int = 2,
    n_class: int = 32,
    prior_weight: float = 1.0,
    trigger: str | None = None,
    checkpoint_every: int = 0,
    grad_clip: float = 1.0,
    should_stop=never,
):
    """Generator (``Progress`` per step, ``Done(FullFinetuneResult)``): DreamBooth fine-tune of every
    UNet parameter of a copy of ``pipe.unet`` (the base is not modified), same objective and data
    draws as :func:`core.finetune.lora.finetune` with the same seed. ``checkpoint_every`` > 0 records the
    per-layer change (not the weights) every that many steps and at the end."""
    from core.finetune.lora import FinetuneConfig, check_photos, encode_photos, encode_prompt, pick_trigger
    from core.model.denoising import Denoiser
    from core.model.pipeline import mixed_precision
    from core.model.prior import class_latents
    from core.model.prompts import CLASS_PROMPT, instance_prompt

    if not 1 <= steps <= 100_000 or not 0 < lr < 1 or batch < 1:
        raise ValueError(f"steps 1..100000, lr in (0, 1), batch >= 1; got {steps!r}, {lr!r}, {batch!r}")
    crops = check_photos(crops)
    t0 = time.perf_counter()
    trigger = trigger or pick_trigger(FinetuneConfig(seed=seed))
    dev = pipe.device
    inst = encode_photos(pipe, crops)
    cls = class_latents(pipe, n_class).to(dev) if prior_weight > 0 and n_class > 0 else None
    yield Message(
        f"full fine-tune; trigger word: {trigger}; {len(crops)} photos; {0 if cls is None else len(cls)} class images"
    )
    torch.manual_seed(seed)
    unet = copy.deepcopy(pipe.unet).float().requires_grad_(True)
    params = [p for p in unet.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    den = Denoiser(pipe.scheduler.config)
    with torch.no_grad():
        emb = torch.cat(
            [encode_prompt(pipe, instance_prompt(trigger)).expand(batch, -1, -1)]
            + ([encode_prompt(pipe, CLASS_PROMPT).expand(batch, -1, -1)] if cls is not None else [])
        ).float()
    w0 = base_state(pipe) if checkpoint_every else None
    g = torch.Generator().manual_seed(seed)
    amp = dev.type == "cuda"
    losses, trajectory = [], {}
    for step in range(1, steps + 1):
        if should_stop():
            break
        unet.train()
        x0 = inst[torch.randint(0, len(inst), (batch,), generator=g)]
        if cls is not None:
            x0 = torch.cat([x0, cls[torch.randint(0, len(cls), (batch,), generator=g)]])
        noised = den.noise(x0, g)
        with mixed_precision(dev, amp):
            pred = unet(noised.noisy, noised.t, emb.to(dev)).sample
        err = den.errors(pred, noised)
        loss = err[:batch].mean() + (prior_weight * err[batch:].mean() if cls is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        yield Progress("full fine-tune", step, steps, time.perf_counter() - t0, {"loss": losses[-1]})
        if checkpoint_every and (step % checkpoint_every == 0 or step == steps):
            trajectory[step] = full_layer_change(w0, {k: v.detach() for k, v in unet.state_dict().items()})
    unet.eval()
    state = {k: v.detach().float().cpu().clone() for k, v in unet.state_dict().items()}
    yield Done(
        FullFinetuneResult(state, trigger, losses, time.perf_counter() - t0, len(losses), trajectory),
        cancelled=len(losses) < steps,
    )
