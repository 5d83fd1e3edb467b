"""The live work of many visitors' checkpoints at once: one stacked sampler call per kind of image.

At a checkpoint the app shows, per visitor, the LoRA's per-layer change, the attacker's
reconstruction from the weights alone (2 images), the LoRA's own samples with the secret trigger
(previews) and their identity distances to the visitor's photos. For the K runs of a
:class:`core.finetune.batch.LoRABatch` that reach a checkpoint at the same step, the
reconstructions of all K come from one stacked sampler loop (:func:`core.model.sampling.stacked`:
one vmapped forward of the K LoRAs plus one base forward per step) and so do the previews. At a
run's last step the previews *are* the utility protocol's samples (seeds 0..3, 25 steps,
:mod:`core.faces.utility`), so the final score reuses them instead of drawing again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.events import LayerChanges, Preview, Reconstruction
from core.faces import metrics
from core.faces.utility import EVAL_SEEDS, Utility, describe_set
from core.finetune.batch import LoRABatch, Run, to_param_names
from core.model.pipeline import initial_latents
from core.model.sampling import decode, denoise, stacked

UTILITY_STEPS = 25  # sampler steps of the utility protocol's samples


@dataclass
class Visit:
    """What the live work needs of one run beyond its weights. The photos' and the floor's mean
    descriptors are computed once per visit (dlib is the slowest part of scoring on a CPU)."""

    run: Run
    photos: list  # the visitor's aligned crops
    cfg: object  # core.finetune.live.LiveConfig
    gallery: np.ndarray  # mean dlib descriptor of the photos
    floor: float  # identity distance of the base model's class-prompt samples to the photos
    attack: bool = True  # the attacker can read this LoRA (False once it could not)

    def distance(self, images) -> float:
        return float(metrics.distance(describe_set(images), self.gallery))


def visit(run: Run, photos, cfg, floor_descriptor: np.ndarray) -> Visit:
    gallery = describe_set(photos)
    return Visit(run, list(photos), cfg, gallery, float(metrics.distance(floor_descriptor, gallery)))


def stacked_images(batch: LoRABatch, loras: list[dict], embs: torch.Tensor, seeds, steps: int, w: float = 1.0):
    """Images of K LoRAs (in-memory naming) at once: ``embs`` K x L x D, the same ``seeds`` for each;
    extrapolated away from the base model's prediction when ``w`` != 1. Returns K lists of images."""
    names = [to_param_names(lo) for lo in loras]
    dev = batch.dev
    params = {n: torch.stack([p[n] for p in names]).to(dev) for n in names[0]}
    n = len(seeds)
    lat = initial_latents(batch.pipe, list(seeds) * len(loras))
    pred = stacked(batch.forward, params, embs, n, base_unet=batch.pipe.unet if w != 1 else None, w=w)
    ims = decode(batch.pipe, denoise(batch.pipe, pred, lat, steps))
    return [ims[k * n : (k + 1) * n] for k in range(len(loras))]


def layer_changes(batch: LoRABatch, visits: list[Visit], shared: list[dict]) -> list[LayerChanges]:
    from core.layers.change import lora_layer_change

    return [
        LayerChanges(v.run.step, lora_layer_change(batch.pipe, lo, v.run.cfg.alpha)) for v, lo in zip(visits, shared)
    ]


def reconstructions(batch: LoRABatch, attacker, visits: list[Visit], shared: list[dict], n_floor: int) -> list:
    """The attacker's images (and distances) for every visit it can read; None where it cannot."""
    from core.attack.attacker import ATTACK_SAMPLER_STEPS, ATTACK_W
    from core.attack.report import as_attacker_reads

    todo = [k for k, v in enumerate(visits) if v.attack and attacker is not None]
    out = [None] * len(visits)
    if not todo:
        return out
    seeds = visits[todo[0]].cfg.attack_seeds
    reads = [as_attacker_reads(shared[k], visits[k].run.cfg.alpha, attacker.cfg) for k in todo]
    with torch.no_grad():
        z = attacker.to(batch.dev).encode(reads, [visits[k].run.step for k in todo])
    ims = stacked_images(batch, [shared[k] for k in todo], z, seeds, ATTACK_SAMPLER_STEPS, ATTACK_W)
    for k, im in zip(todo, ims):
        v = visits[k]
        out[k] = Reconstruction(v.run.step, im, v.distance(im), v.floor, n_floor)
    return out


def previews(batch: LoRABatch, visits: list[Visit], shared: list[dict], recon: list) -> list[Preview]:
    """The LoRAs' own samples with their triggers: the recipe's preview seeds and steps, or, at a run's
    last step, the utility protocol's 4 seeds and 25 steps. Distances where an attack was shown (the
    ceiling) or at the last step (the utility)."""
    from core.finetune.lora import encode_prompt
    from core.model.prompts import instance_prompt

    out: list = [None] * len(visits)
    groups: dict = {}
    for k, v in enumerate(visits):
        spec = (
            (tuple(EVAL_SEEDS), UTILITY_STEPS)
            if v.run.done
            else (tuple(range(v.cfg.finetune.preview_n)), v.cfg.finetune.preview_steps)
        )
        if spec[0]:
            groups.setdefault(spec, []).append(k)
    for (seeds, steps), ks in groups.items():
        with torch.no_grad():
            embs = torch.cat([encode_prompt(batch.pipe, instance_prompt(visits[k].run.trigger)) for k in ks])
        for k, im in zip(ks, stacked_images(batch, [shared[k] for k in ks], embs, seeds, steps)):
            v = visits[k]
            measured = recon[k] is not None or v.run.done
            out[k] = Preview(
                v.run.step, im, "the LoRA's own samples with its trigger", distance=v.distance(im) if measured else None
            )
    return out


def checkpoint_work(batch: LoRABatch, attacker, visits: list[Visit], shared: list[dict], n_floor: int):
    """Per visit, the events of this checkpoint in the order the app shows them."""
    changes = layer_changes(batch, visits, shared)
    recon = reconstructions(batch, attacker, visits, shared, n_floor)
    prev = previews(batch, visits, shared, recon)
    return [[e for e in (changes[k], recon[k], prev[k]) if e is not None] for k in range(len(visits))]


def final_utility(preview: Preview, v: Visit) -> Utility:
    """The utility score from the last step's previews (the protocol's own samples)."""
    return Utility(float(preview.distance), v.floor, list(preview.images))
