"""The visitor's live job: fine-tune, defend, attack every checkpoint, draw, score: one generator.

What the Fine-tune tab shows, computed here and yielded as events (the tab only maps events to
widgets; scripts and tests drain the same job):

1. the fine-tune itself, plain (:func:`core.finetune.lora.finetune`) or with DP-SGD
   (:func:`core.defenses.dp.dp_finetune`): ``Progress`` per step (loss, instance loss, epsilon);
2. at every checkpoint, the LoRA *as it would be shared* (after the chosen post-hoc defense,
   :mod:`core.defenses.posthoc`): its per-layer change (``LayerChanges``, for the Layers tab's
   heatmap over the steps), its own samples with the secret trigger (``Preview``) and, when a trained
   attacker can read it, the attacker's reconstruction from the weights alone with its identity
   distance to the photos (``Reconstruction``; floor = the base model's class-prompt samples,
   ceiling = the preview samples with the true trigger);
3. at the end, the utility score (the LoRA's 4 trigger samples vs the photos, :mod:`core.faces.utility`)
   of the shared LoRA and, with a defense, of the LoRA before it: ``Done(LiveResult)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from core.events import Checkpoint, Done, LayerChanges, Message, Preview, Reconstruction, never
from core.finetune.lora import MAX_PHOTOS, MIN_PHOTOS, FinetuneConfig, FinetuneResult, pick_trigger, pipeline_with_lora

LIVE_SEEDS = (0, 1)  # the attacker's reconstructions per checkpoint


@dataclass(frozen=True)
class AttackUnavailable:
    """The live attack stopped (or never started) for this run; ``reason`` is a sentence for the visitor."""

    reason: str

    @classmethod
    def because(cls, mismatch: str) -> AttackUnavailable:
        """From :func:`core.attack.report.attacker_mismatch`'s sentence."""
        return cls(f"The attacker cannot read this LoRA: {mismatch} The fine-tune goes on without the live attack.")


@dataclass
class LiveConfig:
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # the fine-tune recipe
    dp_noise: float | None = None  # DP-SGD noise multiplier sigma (None = a plain fine-tune)
    defense: str | None = None  # post-hoc defense applied to what is shared (core.defenses.posthoc.DEFENSES)
    strength: float | None = None  # the defense's strength (its unit depends on the defense)
    live_attack: bool = True  # attack every checkpoint with the trained attacker
    attack_seeds: tuple[int, ...] = LIVE_SEEDS  # seeds of the reconstructions per checkpoint

    def __post_init__(self):
        from core.defenses.posthoc import DEFENSES, apply_defense

        if self.dp_noise is not None:
            if not self.dp_noise >= 0:
                raise ValueError(f"the DP noise multiplier must be >= 0, got {self.dp_noise!r}")
            if self.finetune.text_encoder:
                raise ValueError("DP-SGD trains the UNet LoRA only: turn off the text-encoder LoRA to use it")
        if self.defense is not None:
            if self.defense not in DEFENSES:
                raise ValueError(f"unknown defense {self.defense!r}; known: {', '.join(DEFENSES)}")
            if self.strength is None:
                raise ValueError(f"the defense {self.defense!r} needs a strength")
            if self.defense in ("quantize", "rank_truncate"):
                self.strength = int(round(self.strength))
            apply_defense({}, self.defense, self.strength)  # the defense's own check of its strength


@dataclass
class LiveResult:
    result: FinetuneResult  # the LoRA as shared (after the defense), with its trigger and losses
    raw_lora: dict  # the LoRA before the defense (the same as result.lora without one)
    utility: object  # core.faces.utility.Utility of the shared LoRA
    utility_before_defense: object | None  # the same for the LoRA before the defense (None without one)
    epsilon: float | None = None  # DP-SGD's epsilon per photo (None without DP)
    noise_multiplier: float | None = None


def shared_lora(lora: dict, cfg: LiveConfig) -> dict:
    """The LoRA as the visitor would share it: after the post-hoc defense, if any."""
    from core.defenses.posthoc import apply_defense

    return apply_defense(lora, cfg.defense, cfg.strength) if cfg.defense else lora


def fine_tune_events(pipe, photos, cfg: LiveConfig, should_stop):
    """The underlying fine-tune's events (previews off with a defense: they are drawn here from the
    defended LoRA)."""
    ft = replace(cfg.finetune, preview_n=0) if cfg.defense else cfg.finetune
    if cfg.dp_noise is not None:
        from core.defenses.dp import DPConfig, dp_finetune

        return dp_finetune(pipe, photos, ft, DPConfig(noise_multiplier=cfg.dp_noise), should_stop=should_stop)
    from core.finetune.lora import finetune

    return finetune(pipe, photos, ft, should_stop=should_stop)


class _Attack:
    """The live attack's state over one run: the floor once, a distance per attacked step."""

    def __init__(self, pipe, attacker, photos, floor_images, cfg: LiveConfig):
        self.pipe, self.attacker, self.photos, self.cfg = pipe, attacker, photos, cfg
        self.floor_images = floor_images
        self.floor = None
        self.last_step = None

    def at(self, step: int, lora: dict):
        """A Reconstruction event for this checkpoint, a Message when the attacker cannot read it, or None."""
        from core.attack.report import attacker_mismatch, reconstruct_lora
        from core.faces.utility import identity_distance

        if self.attacker is None:
            return None
        why = attacker_mismatch(self.attacker, lora)
        if why:
            self.attacker = None
            return AttackUnavailable.because(why)
        ims = reconstruct_lora(
            self.pipe, self.attacker, lora, step, self.cfg.finetune.alpha, seeds=self.cfg.attack_seeds
        )
        if self.floor is None:
            self.floor = identity_distance(self.floor_images, self.photos)
        self.last_step = step
        return Reconstruction(step, ims, identity_distance(ims, self.photos), self.floor, len(self.floor_images))


def live_finetune(
    pipe, photos, cfg: LiveConfig | None = None, attacker=None, floor_images=None, should_stop=never, train_photos=None
):
    """Generator: the visitor's live job on ``photos`` (aligned crops at the model's resolution).
    ``attacker``: the trained attacker for this base (None: no live attack); ``floor_images``: the
    base model's class-prompt samples (:func:`core.faces.utility.floor_images`, computed if None);
    ``train_photos``: what the LoRA trains on when it is not ``photos`` (e.g. their cloaked versions;
    every score still compares with ``photos``)."""
    from core.faces.utility import floor_images as make_floor
    from core.faces.utility import lora_utility
    from core.layers.change import lora_layer_change
    from core.model.pipeline import sample_images
    from core.model.prompts import instance_prompt

    cfg = cfg or LiveConfig()
    photos = list(photos)[:MAX_PHOTOS]
    train_photos = list(train_photos)[:MAX_PHOTOS] if train_photos is not None else photos
    if len(photos) < MIN_PHOTOS:
        raise ValueError(f"a fine-tune needs at least {MIN_PHOTOS} photos of one face, got {len(photos)}")
    ft = cfg.finetune
    if ft.trigger is None:
        ft = replace(ft, trigger=pick_trigger(ft))
        cfg = replace(cfg, finetune=ft)
    floor_images = floor_images if floor_images is not None else make_floor(pipe)
    attack = _Attack(pipe, attacker if cfg.live_attack else None, photos, floor_images, cfg)
    yield Message(f"trigger word: {ft.trigger}")
    done = None
    for ev in fine_tune_events(pipe, train_photos, cfg, should_stop):
        if isinstance(ev, Checkpoint):
            lora = shared_lora(ev.lora, cfg)
            yield LayerChanges(ev.step, lora_layer_change(pipe, lora, ft.alpha))
            rec = attack.at(ev.step, lora)
            if rec is not None:
                yield rec
            if cfg.defense and ft.preview_n:  # the defended LoRA's own samples, as the fine-tune draws its previews
                ims = sample_images(
                    pipeline_with_lora(pipe, lora, ft.alpha),
                    instance_prompt(ft.trigger),
                    n=ft.preview_n,
                    seed=0,
                    steps=ft.preview_steps,
                )
                yield _preview(ev.step, ims, attack, photos, cfg)
        elif isinstance(ev, Preview):
            yield _preview(ev.step, ev.images, attack, photos, cfg)
        elif isinstance(ev, Done):
            done = ev
        else:
            yield ev
    if done is None or done.cancelled:
        yield Done(None, cancelled=True)
        return
    res = done.result
    shared = replace(res, lora=shared_lora(res.lora, cfg))
    yield Message("scoring the LoRA against the photos")
    u = lora_utility(pipe, shared.lora, shared.trigger, photos, alpha=ft.alpha, floor=floor_images)
    u0 = lora_utility(pipe, res.lora, res.trigger, photos, alpha=ft.alpha, floor=floor_images) if cfg.defense else None
    yield Done(
        LiveResult(shared, res.lora, u, u0, getattr(res, "epsilon", None), getattr(res, "noise_multiplier", None))
    )


def _preview(step: int, images, attack: _Attack, photos, cfg: LiveConfig) -> Preview:
    """A Preview of the LoRA's own trigger samples; at an attacked step it carries the ceiling distance."""
    from core.faces.utility import identity_distance

    ceiling = identity_distance(images, photos) if attack.last_step == step else None
    return Preview(step, list(images), "the LoRA's own samples with its trigger", distance=ceiling)
