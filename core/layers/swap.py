"""Keep only the busiest layers: how much of a fine-tune survives when only its k busiest layers are
copied into the base (Liu et al.'s Fig. 3), for a LoRA and for a full fine-tune."""

from __future__ import annotations

from dataclasses import dataclass

from core.layers.change import (
    DEFAULT_KS,
    LayerChange,
    base_state,
    full_layer_change,
    lora_layer_change,
    pipeline_with_state,
    rank_layers,
)


def resolve_ks(ks, n: int) -> list[int]:
    """Layer counts for a swap curve: None / "all" -> n, others clipped to 0..n, sorted, unique."""
    out = set()
    for k in ks:
        out.add(n if k is None or k == "all" else max(0, min(int(k), n)))
    return sorted(out)


def keep_top_k(lora: dict, ranking: list[LayerChange], k: int) -> dict:
    """The LoRA with only the UNet adapters of the first ``k`` layers of ``ranking`` (adapters of other
    parts, e.g. the text encoder's, are kept as they are: the ranking covers the UNet only)."""
    keep = {c.name for c in ranking[: max(0, k)]}
    return {
        key: v
        for key, v in lora.items()
        if not key.startswith("unet.") or key[len("unet.") :].rsplit(".lora_", 1)[0] in keep
    }


def full_keep_top_k(w0: dict, wt: dict, ranking: list[LayerChange], k: int) -> dict:
    """The base state dict with the weights (and biases) of the first ``k`` layers of ``ranking``
    copied from the fine-tuned ``wt``; every other tensor, norms included, stays the base's."""
    out = dict(w0)
    for c in ranking[: max(0, k)]:
        for key in (f"{c.name}.weight", f"{c.name}.bias"):
            if key in wt:
                out[key] = wt[key]
    return out


@dataclass(frozen=True)
class SwapRow:
    k: int  # layers kept (the k busiest)
    n_layers: int  # layers the fine-tune has
    distance: float  # dlib distance, samples with the true trigger -> private photos (lower = closer)
    floor: float  # the base model's class-prompt samples -> private photos


def _floor_images(pipe, floor, steps):
    from core.faces.utility import floor_images

    return floor if floor is not None else floor_images(pipe, steps)


def iter_swap_curve(
    pipe,
    lora: dict,
    trigger: str,
    photos,
    ks=DEFAULT_KS,
    alpha: float | None = None,
    changes: list[LayerChange] | None = None,
    steps: int = 25,
    floor: list | None = None,
):
    """Yields a :class:`SwapRow` per k (ascending): utility (:func:`core.faces.utility.lora_utility`) of the
    LoRA reduced to its k busiest modules. ``floor``: the base model's class-prompt samples, if cached."""
    from core.faces.utility import lora_utility

    ranking = rank_layers(changes if changes is not None else lora_layer_change(pipe, lora, alpha))[0]
    floor = _floor_images(pipe, floor, steps)
    for k in resolve_ks(ks, len(ranking)):
        u = lora_utility(pipe, keep_top_k(lora, ranking, k), trigger, photos, alpha=alpha, steps=steps, floor=floor)
        yield SwapRow(k, len(ranking), u.distance, u.floor)


def swap_curve(
    pipe, lora: dict, trigger: str, photos, ks=DEFAULT_KS, alpha: float | None = None, **kw
) -> list[SwapRow]:
    """All rows of :func:`iter_swap_curve`."""
    return list(iter_swap_curve(pipe, lora, trigger, photos, ks, alpha, **kw))


def iter_full_swap_curve(
    pipe,
    wt: dict,
    trigger: str,
    photos,
    ks=DEFAULT_KS,
    changes: list[LayerChange] | None = None,
    steps: int = 25,
    floor: list | None = None,
):
    """Like :func:`iter_swap_curve` for a full fine-tune (state dict ``wt``): the base UNet with only
    its k busiest weight tensors (and their biases) copied from ``wt``."""
    from core.faces.utility import EVAL_SEEDS, GUIDANCE, identity_distance
    from core.model.pipeline import sample_images
    from core.model.prompts import instance_prompt

    w0 = base_state(pipe)
    ranking = rank_layers(changes if changes is not None else full_layer_change(w0, wt))[0]
    floor_d = identity_distance(_floor_images(pipe, floor, steps), photos)
    for k in resolve_ks(ks, len(ranking)):
        view = pipeline_with_state(pipe, full_keep_top_k(w0, wt, ranking, k))
        ims = sample_images(view, instance_prompt(trigger), seed=list(EVAL_SEEDS), steps=steps, guidance=GUIDANCE)
        yield SwapRow(k, len(ranking), identity_distance(ims, photos), floor_d)


def full_swap_curve(pipe, wt: dict, trigger: str, photos, ks=DEFAULT_KS, **kw) -> list[SwapRow]:
    return list(iter_full_swap_curve(pipe, wt, trigger, photos, ks, **kw))
