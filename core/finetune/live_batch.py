"""The live work of many visitors' checkpoints at once, beside the training that goes on.

At a checkpoint the app shows, per visitor, the LoRA's per-layer change (:func:`layer_changes`,
cheap: computed by the trainer at once), then the attacker's reconstruction from the weights alone
(2 images), the LoRA's own samples with the secret trigger (previews) and their identity distances
to the visitor's photos: :func:`checkpoint_images`, a generator that yields each as soon as it is
ready. :class:`core.finetune.hub.TrainingHub` runs it in a thread of its own
while the next steps train (each checkpoint is a frozen :class:`Due`: the LoRA as shared at that step).

For the K runs whose checkpoints are due together, how the sampler runs the K LoRAs depends on
the device (:class:`Models`): on a GPU one vmapped forward of all K per step
(:func:`core.model.sampling.stacked`: one launch-bound call instead of K), the reconstructions of
all K in one sampler loop and the previews in another; on a CPU one checkpoint after another, its
LoRA merged into one scratch copy of the UNet (no per-layer LoRA products, no vmap: 34 against
67 ms per forward at 64 px, ``python -m bench.live_work``), serving both its reconstruction and
its previews. At a run's last step the previews *are* the utility protocol's samples (seeds 0..3,
25 steps, :mod:`core.faces.utility`), so the final score reuses them instead of drawing again.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from core.events import LayerChanges, Preview, Reconstruction
from core.faces import metrics
from core.faces.utility import EVAL_SEEDS, Utility, describe_set
from core.finetune.batch import adapter_unet, stacked_forward, to_param_names
from core.finetune.live import AttackUnavailable
from core.model.pipeline import initial_latents
from core.model.sampling import decode, denoise, stacked

UTILITY_STEPS = 25  # sampler steps of the utility protocol's samples
PREVIEW_CAPTION = "the LoRA's own samples with its trigger"
# of a visitor's last 4 previews, those the helper thread draws (side_by_side) while the other draws
# the reconstruction (16 UNet forwards of 2 images) and the rest: on one core at 128 px a forward of
# 1 / 2 / 3 / 4 images takes about 1 / 1.6 / 2.7 / 3.8 units, so 3 there and 1 here end nearest together
HELPER_SEEDS = 3


@dataclass(eq=False)
class Visit:
    """What the live work needs of one visitor beyond the weights. The photos' mean descriptor is
    computed once per visit, on first use or when :meth:`describe_soon` asks (dlib is the slowest
    part of scoring on a CPU)."""

    photos: list  # the visitor's aligned crops
    cfg: object  # core.finetune.live.LiveConfig (its trigger set)
    floor_descriptor: np.ndarray = field(repr=False)  # mean dlib descriptor of the base model's class-prompt samples
    attack: bool = True  # the attacker can read this LoRA (False once it could not)
    _gallery: np.ndarray | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def gallery(self) -> np.ndarray:
        """The photos' mean descriptor (computed once, by whichever thread asks first)."""
        with self._lock:
            if self._gallery is None:
                self._gallery = describe_set(self.photos)
            return self._gallery

    def describe_soon(self) -> None:
        """Describe the photos now, in a thread of its own (the training hub, as a visit starts: with
        dlib in its worker process the thread only waits), so that the first checkpoint need not."""
        threading.Thread(target=lambda: self.gallery, name="describe-photos", daemon=True).start()

    @cached_property
    def floor(self) -> float:
        """Identity distance of the base model's class-prompt samples to the photos."""
        return float(metrics.distance(self.floor_descriptor, self.gallery))

    def distance(self, images) -> float:
        return float(metrics.distance(describe_set(images), self.gallery))


@dataclass(frozen=True, eq=False)
class Due:
    """One visit's checkpoint, frozen when it was taken: the LoRA as shared at ``step``."""

    visit: Visit
    step: int
    lora: dict  # the LoRA as the visitor would share it (after the defense), in-memory naming
    last: bool  # the run's last step: its previews are the utility protocol's samples


def layer_changes(pipe, due: list[Due]) -> list[LayerChanges]:
    from core.layers.change import lora_layer_change

    return [LayerChanges(d.step, lora_layer_change(pipe, d.lora, d.visit.cfg.finetune.alpha)) for d in due]


class Sampler:
    """Draws the LoRAs of the checkpoints due together (see the module docstring). One per thread
    that samples: the GPU path's adapter UNet swaps its parameters during each call, and the CPU
    path merges each LoRA in turn into one scratch copy of the UNet (allocated once: a copy per LoRA
    would hold K UNets at once and the process would keep the memory)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.merge = merge_each(pipe.device)
        self._forward = {}  # recipe -> vmapped adapter forward (GPU path)
        self._view = None  # pipeline view with the scratch UNet (CPU path)
        self._weights = {}  # module name -> its base weight, for every scratch weight changed so far

    def forward(self, cfg):
        key = (cfg.rank, cfg.alpha, tuple(cfg.unet_targets))
        if key not in self._forward:
            self._forward[key] = stacked_forward(adapter_unet(self.pipe, cfg))
        return self._forward[key]

    def prepare(self) -> None:
        """Allocate the CPU path's scratch UNet now rather than at the first checkpoint (a copy of the
        UNet and a pipeline view: about a second on one core, which a visitor would otherwise wait for)."""
        from core.model.pipeline import private_view

        if self.merge and self._view is None:
            self._view = private_view(self.pipe)
            self._view.unet = copy.deepcopy(self.pipe.unet)

    @torch.no_grad()
    def merged(self, lora: dict, alpha: float):
        """A pipeline view whose UNet is the base's with ``lora`` (UNet part) merged in: the scratch
        copy, its changed weights first put back to the base's."""
        from core.finetune.lora import merge_lora_, split_components

        self.prepare()
        mods = dict(self._view.unet.named_modules())
        for name, w in self._weights.items():
            mods[name].weight.copy_(w)
        sub = split_components(lora).get("unet", {})
        for name in {k.rsplit(".lora_A.weight", 1)[0] for k in sub if k.endswith(".lora_A.weight")}:
            self._weights.setdefault(name, mods[name].weight.detach().clone())
        merge_lora_(self._view.unet, sub, alpha)
        return self._view


class Models:
    """The LoRAs of ``due`` as the sampler runs them: one merged LoRA at a time (CPU: ``due`` holds
    one checkpoint) or one stack of all (GPU)."""

    def __init__(self, sampler: Sampler, due: list[Due]):
        self.sampler, self.due = sampler, due
        if sampler.merge and len(due) != 1:
            raise ValueError("the CPU path draws one merged LoRA at a time")
        self.view = sampler.merged(due[0].lora, due[0].visit.cfg.finetune.alpha) if sampler.merge else None

    def images(self, ks: list[int], embs: torch.Tensor, seeds, steps: int, w: float = 1.0) -> list[list]:
        """Images of LoRAs ``ks`` (``embs``: one L x D prompt embedding per LoRA, the same ``seeds``
        for each), extrapolated away from the base model's prediction when ``w`` != 1 (the attacker's
        sampling, :func:`core.attack.baselines.extrapolate`)."""
        from core.attack.baselines import extrapolate

        pipe = self.sampler.pipe
        if self.view is not None:
            return [extrapolate(pipe, self.view, e[None], w, seeds, steps) for e in embs]
        forward = self.sampler.forward(self.due[ks[0]].visit.cfg.finetune)
        return stacked_images(pipe, forward, [self.due[k].lora for k in ks], embs, seeds, steps, w)


def merge_each(device) -> bool:
    """Sample K LoRAs one merged copy at a time (CPU) rather than in one vmapped forward (GPU)."""
    return torch.device(device).type == "cpu"


def stacked_images(pipe, forward, loras: list[dict], embs: torch.Tensor, seeds, steps: int, w: float = 1.0):
    """Images of K LoRAs (in-memory naming, one recipe) in one vmapped ``forward`` per step: ``embs``
    K x L x D, the same ``seeds`` for each; extrapolated away from the base model's prediction when
    ``w`` != 1. Returns K lists of images."""
    names = [to_param_names(lo) for lo in loras]
    params = {n: torch.stack([p[n] for p in names]).to(pipe.device) for n in names[0]}
    n = len(seeds)
    lat = initial_latents(pipe, list(seeds) * len(loras))
    pred = stacked(forward, params, embs, n, base_unet=pipe.unet if w != 1 else None, w=w)
    ims = decode(pipe, denoise(pipe, pred, lat, steps))
    return [ims[k * n : (k + 1) * n] for k in range(len(loras))]


def readable(attacker, due: list[Due]) -> list:
    """Per checkpoint: None when the attacker can read it (or there is none), else an
    :class:`AttackUnavailable` the first time (the visit is not attacked again)."""
    from core.attack.report import attacker_mismatch

    out = [None] * len(due)
    for k, d in enumerate(due):
        why = attacker_mismatch(attacker, d.lora) if attacker is not None and d.visit.attack else None
        if why:
            d.visit.attack = False
            out[k] = AttackUnavailable.because(why)
    return out


def reconstructions(attacker, due: list[Due], models: Models, n_floor: int) -> list:
    """The attacker's images (and distances) for every checkpoint it can read; None where it cannot."""
    from core.attack.attacker import ATTACK_SAMPLER_STEPS, ATTACK_W
    from core.attack.report import as_attacker_reads

    todo = [k for k, d in enumerate(due) if d.visit.attack and attacker is not None]
    out = [None] * len(due)
    if not todo:
        return out
    seeds = due[todo[0]].visit.cfg.attack_seeds
    reads = [as_attacker_reads(due[k].lora, due[k].visit.cfg.finetune.alpha, attacker.cfg) for k in todo]
    with torch.no_grad():
        z = attacker.to(models.sampler.pipe.device).encode(reads, [due[k].step for k in todo])
    for k, im in zip(todo, models.images(todo, z, seeds, ATTACK_SAMPLER_STEPS, ATTACK_W)):
        v = due[k].visit
        out[k] = Reconstruction(due[k].step, im, v.distance(im), v.floor, n_floor)
    return out


def previews(due: list[Due], models: Models, recon: list) -> list[Preview]:
    """The LoRAs' own samples with their triggers: the recipe's preview seeds and steps, or, at a run's
    last step, the utility protocol's 4 seeds and 25 steps. Distances where an attack was shown (the
    ceiling) or at the last step (the utility)."""
    from core.finetune.lora import encode_prompt
    from core.model.prompts import instance_prompt

    out: list = [None] * len(due)
    groups: dict = {}
    for k, d in enumerate(due):
        ft = d.visit.cfg.finetune
        spec = (tuple(EVAL_SEEDS), UTILITY_STEPS) if d.last else (tuple(range(ft.preview_n)), ft.preview_steps)
        if spec[0]:
            groups.setdefault(spec, []).append(k)
    pipe = models.sampler.pipe
    for (seeds, steps), ks in groups.items():
        with torch.no_grad():
            embs = torch.cat([encode_prompt(pipe, instance_prompt(due[k].visit.cfg.finetune.trigger)) for k in ks])
        for k, im in zip(ks, models.images(ks, embs, seeds, steps)):
            d = due[k]
            distance = d.visit.distance(im) if recon[k] is not None or d.last else None
            out[k] = Preview(d.step, im, PREVIEW_CAPTION, distance=distance)
    return out


def checkpoint_images(sampler: Sampler, attacker, due: list[Due], n_floor: int, helper: Sampler | None = None):
    """Generator of ``(k, event)``: checkpoint ``k``'s reconstruction (or why there is none), then
    its previews, as soon as each is ready: on a GPU each kind for all checkpoints of one recipe at
    once, on a CPU checkpoint after checkpoint (one merged LoRA at a time). ``helper``: a second
    sampler, given when one run's last checkpoint is all there is to do and a core idles; on a CPU
    its previews are then drawn on that core while the reconstruction is drawn here."""
    for k, ev in enumerate(readable(attacker, due)):
        if ev is not None:
            yield k, ev
    if helper is not None and sampler.merge and len(due) == 1 and due[0].last:
        yield from side_by_side(sampler, helper, attacker, due, n_floor)
        return
    for ks in [[k] for k in range(len(due))] if sampler.merge else list(by_recipe(due).values()):
        part = [due[k] for k in ks]
        models = Models(sampler, part)
        recon = reconstructions(attacker, part, models, n_floor)
        yield from ((ks[j], ev) for j, ev in enumerate(recon) if ev is not None)
        yield from ((ks[j], ev) for j, ev in enumerate(previews(part, models, recon)) if ev is not None)


def side_by_side(sampler: Sampler, helper: Sampler, attacker, due: list[Due], n_floor: int):
    """A last checkpoint drawn on two threads, one core and one scratch UNet each: here its
    reconstruction, then the last of the utility protocol's preview seeds; in a thread of its own the
    other seeds (``HELPER_SEEDS``), so that both end together. The events are the one-thread path's,
    in its order: the reconstruction as soon as it is drawn, then the previews with their distance
    (each image depends on its own seed only, so splitting the seeds changes no image). Two threads
    of one core beat one thread of two here: a UNet forward on a 16 x 16 grid keeps a second OpenMP
    thread barely busy (the 4 x 25-step previews ran 1.16x faster on 2 cores)."""
    from core.finetune.lora import encode_prompt
    from core.model.pipeline import thread_with_cores
    from core.model.prompts import instance_prompt

    d = due[0]
    seeds = tuple(EVAL_SEEDS)
    with torch.no_grad():
        emb = encode_prompt(sampler.pipe, instance_prompt(d.visit.cfg.finetune.trigger))
    box: dict = {}

    def draw(models: Models, part: tuple) -> list:
        return models.images([0], emb, part, UTILITY_STEPS)[0] if part else []

    def draw_helper():
        try:
            box["images"] = draw(Models(helper, due), seeds[:HELPER_SEEDS])
        except Exception as e:  # raised in the caller's thread below
            box["error"] = e

    th = thread_with_cores(draw_helper, 1, "live-previews")
    try:
        models = Models(sampler, due)
        recon = reconstructions(attacker, due, models, n_floor)[0]
        if recon is not None:
            yield 0, recon
        mine = draw(models, seeds[HELPER_SEEDS:])
    finally:
        th.join()
    if "error" in box:
        raise box["error"]
    images = box["images"] + mine
    yield 0, Preview(d.step, images, PREVIEW_CAPTION, distance=d.visit.distance(images))


def by_recipe(due: list[Due]) -> dict:
    """Indices of ``due`` grouped by the recipe fields that shape a stacked forward (checkpoints taken
    from two batches one after the other may differ)."""
    groups: dict = {}
    for k, d in enumerate(due):
        ft = d.visit.cfg.finetune
        groups.setdefault((ft.rank, ft.alpha, tuple(ft.unet_targets)), []).append(k)
    return groups


def final_utility(preview: Preview, v: Visit) -> Utility:
    """The utility score from the last step's previews (the protocol's own samples)."""
    return Utility(float(preview.distance), v.floor, list(preview.images))
