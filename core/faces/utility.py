"""How well a LoRA does its job: does it draw the person it was trained on?

Protocol (docs/EVAL): 4 images (seeds 0..3) of the LoRA with its true trigger; their mean dlib
descriptor; Euclidean distance to the subject's gallery entry (mean descriptor of the private
photos). Floor: the same for the base model with the class prompt ("a random face").
Lower is better; < 0.6 is "the same person" by dlib's rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.faces import metrics
from core.faces import recognition as faces
from core.finetune.lora import pipeline_with_lora
from core.model.pipeline import sample_images
from core.model.prompts import CLASS_PROMPT, instance_prompt

EVAL_SEEDS = (0, 1, 2, 3)
GUIDANCE = 1.0  # classifier-free guidance scale of every scored sample


@dataclass(frozen=True)
class Utility:
    distance: float  # LoRA + true trigger -> private photos
    floor: float  # base model + class prompt -> private photos
    images: list  # the LoRA's 4 trigger samples

    @property
    def same_person(self) -> bool:
        return self.distance < metrics.SAME_PERSON

    @property
    def beats_floor(self) -> bool:
        return self.distance < self.floor


def describe_set(images) -> np.ndarray:
    """Mean descriptor of a set of images (the protocol's single vector per set)."""
    return metrics.gallery_entry(faces.describe(images))


def identity_distance(images, photos) -> float:
    """Distance between the mean descriptors of a set of images and of a set of photos."""
    return float(metrics.distance(describe_set(images), describe_set(photos)))


def floor_images(pipe, steps: int = 25, guidance: float = GUIDANCE):
    return sample_images(pipe, CLASS_PROMPT, seed=list(EVAL_SEEDS), steps=steps, guidance=guidance)


def lora_utility(
    pipe,
    lora: dict,
    trigger: str,
    private_crops,
    alpha: float | None = None,
    steps: int = 25,
    floor: list | None = None,
    guidance: float = GUIDANCE,
) -> Utility:
    """Distance of the LoRA's trigger samples to the private photos, next to the class-prompt floor
    (both sampled with the same guidance scale)."""
    gallery = describe_set(private_crops)
    ims = sample_images(
        pipeline_with_lora(pipe, lora, alpha),
        instance_prompt(trigger),
        seed=list(EVAL_SEEDS),
        steps=steps,
        guidance=guidance,
    )
    floor = floor if floor is not None else floor_images(pipe, steps, guidance)
    return Utility(
        float(metrics.distance(describe_set(ims), gallery)), float(metrics.distance(describe_set(floor), gallery)), ims
    )
