"""One shared LoRA under every weight-only attack, scored against reference photos.

Used by the app's Attack tab and by the live attack of its Fine-tune tab:
- :func:`attacker_mismatch`: why the trained attacker cannot read a LoRA (a rank or layers it was
  not trained on), or None;
- :func:`reconstruct_lora`: the attacker's reconstruction of a LoRA of any alpha (the attacker
  reads the update (alpha / r) B A; the LoRA's own model, merged with its own alpha, draws);
- :func:`attack_lora`: the reconstruction beside the weight-only baselines of :mod:`core.attack.baselines`
  (naive, FineXtract-style) and, when the trigger is known, the ceiling, all from one merged model;
- :func:`distances`: dlib identity distance of each image set to the reference photos (the
  protocol of :mod:`core.faces.utility`: mean descriptor of a set vs mean descriptor of the photos).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.attack import baselines
from core.attack.attacker import ATTACK_SAMPLER_STEPS, factors, module_names, reconstruct
from core.faces import metrics
from core.faces.utility import describe_set
from core.finetune.lora import pipeline_with_lora

SEEDS = (0, 1, 2, 3)


def attacker_mismatch(attacker, lora: dict) -> str | None:
    """A sentence saying why ``attacker`` cannot read ``lora`` (rank or UNet layers differ from the
    LoRAs it was trained on), or None when it can."""
    cfg = attacker.cfg
    names = set(module_names(lora))
    missing = [m for m in cfg.modules if m not in names]
    if missing:
        return (
            f"The attacker reads the LoRA of {len(cfg.modules)} UNet layers (the layers this app's fine-tune "
            f"adapts); this LoRA lacks {len(missing)} of them (for example `{missing[0]}`), so it was made "
            "with other target layers and the attacker cannot read it."
        )
    for name, shape in zip(cfg.modules, cfg.shapes):
        b, a = factors(lora, name)
        if a.shape[0] != cfg.rank:
            return (
                f"The attacker was trained on rank-{cfg.rank} LoRAs and reads only those; this LoRA has "
                f"rank {a.shape[0]}."
            )
        if [b.shape[0], a.shape[1]] != list(shape):
            return (
                f"The LoRA of layer `{name}` has shape {[b.shape[0], a.shape[1]]}, the attacker expects "
                f"{list(shape)}: it was trained for another layout and cannot read this LoRA."
            )
    return None


def as_attacker_reads(lora: dict, alpha: float, cfg) -> dict:
    """The LoRA's UNet part with B rescaled so that the attacker's fixed scale (cfg.alpha / cfg.rank)
    times B' A' equals the LoRA's true update (alpha / r) B A."""
    unet = {k: v for k, v in lora.items() if k.startswith("unet.")}
    r = next(v.shape[0] for k, v in unet.items() if k.endswith(".lora_A.weight"))
    f = (alpha / r) / (cfg.alpha / cfg.rank)
    if f == 1.0:
        return unet
    return {k: v * f if k.endswith(".lora_B.weight") else v for k, v in unet.items()}


def reconstruct_lora(
    pipe, attacker, lora: dict, step: int, alpha: float, seeds=SEEDS, steps: int = ATTACK_SAMPLER_STEPS, model=None
) -> list:
    """The attacker's images of the person behind ``lora`` (weights and fine-tuning ``step`` only:
    no trigger, no photos). ``model``: the LoRA's merged pipeline if already built. Raises
    ValueError with :func:`attacker_mismatch`'s sentence if the attacker cannot read the LoRA."""
    why = attacker_mismatch(attacker, lora)
    if why:
        raise ValueError(why)
    model = model if model is not None else pipeline_with_lora(pipe, lora, alpha)
    images, _ = reconstruct(
        pipe,
        attacker,
        as_attacker_reads(lora, alpha, attacker.cfg),
        int(step),
        seeds=tuple(seeds),
        steps=steps,
        model=model,
    )
    return images


@dataclass
class AttackImages:
    """Images of one LoRA under each weight-only attack (same seeds); ``attack`` None with
    ``attack_note`` saying why when the trained attacker is missing or cannot read the LoRA."""

    naive: list
    finextract: list
    attack: list | None = None
    attack_note: str = ""
    ceiling: list | None = None  # only when the trigger is known (the visitor's own LoRA)
    seeds: tuple = SEEDS
    notes: list = field(default_factory=list)


def attack_lora(
    pipe,
    attacker,
    lora: dict,
    step: int,
    alpha: float,
    trigger: str | None = None,
    seeds=SEEDS,
    attacker_note: str = "",
) -> AttackImages:
    """Every weight-only attack on one LoRA (merged once): the attacker's reconstruction (if
    ``attacker`` is given and can read it), naive (class prompt) and FineXtract-style sampling, and
    the ceiling (true trigger) when ``trigger`` is given."""
    model = pipeline_with_lora(pipe, lora, alpha)
    out = AttackImages(
        naive=baselines.naive(pipe, lora, seeds=seeds, model=model),
        finextract=baselines.finextract(pipe, lora, seeds=seeds, model=model),
        seeds=tuple(seeds),
    )
    if attacker is None:
        out.attack_note = attacker_note or "No trained attacker is available."
    else:
        why = attacker_mismatch(attacker, lora)
        if why:
            out.attack_note = why
        else:
            out.attack = reconstruct_lora(pipe, attacker, lora, step, alpha, seeds=seeds, model=model)
    if trigger:
        out.ceiling = baselines.ceiling(pipe, lora, trigger, seeds=seeds, model=model)
    return out


def distances(sets: dict, photos) -> dict:
    """{name: dlib identity distance of that image set to ``photos``} (None where the set is None);
    the photos' mean descriptor is computed once."""
    ref = describe_set(photos)
    return {
        name: None if ims is None else float(metrics.distance(describe_set(ims), ref)) for name, ims in sets.items()
    }


def recorded_steps(meta: dict) -> int | None:
    """The fine-tuning step count a LoRA file records (``leaklab_steps``, written by
    :func:`core.finetune.lora.save_lora`), or None when absent or not a positive integer."""
    try:
        n = int(str(meta.get("leaklab_steps", "")).strip())
    except ValueError:
        return None
    return n if n > 0 else None
