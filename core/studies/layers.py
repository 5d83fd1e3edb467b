"""Do the busiest layers carry the fine-tune? ``python -m core.studies.layers``.

The claim of Liu et al. (arXiv 2405.00466, their Fig. 3) in this app's terms: rank the layers of a
fine-tune by relative change (:mod:`core.layers.change`), keep only the ``k`` busiest in the base model, and
most of what the fine-tune does survives; keeping the ``k`` laziest, or ``k`` layers picked at random,
keeps much less. Protocol:

- **LoRA**: the first ``--n`` victims' default-recipe LoRAs (the cached ones of
  :func:`core.studies.attack.train_victim_loras`); for each k of ``--ks``: the LoRA reduced to its k busiest,
  k laziest and k random modules (a fixed seed per victim);
- **full fine-tune**: the first ``--full-n`` victims, :func:`core.finetune.full.full_finetune` for
  ``--full-steps`` steps, then the base UNet with only the k busiest / laziest / random weight
  tensors copied from the fine-tuned one;
- **utility** of each (:mod:`core.faces.utility`, the identity protocol): dlib distance of 4 samples with
  the true trigger to the victim's 5 private photos; beside it the floor (the base model's
  class-prompt samples) and the whole fine-tune (every layer). **Kept** = the share of the whole
  fine-tune's gain over the floor that the reduced model keeps, mean(floor - d_k) / mean(floor - d_all);
- **concentration**: the share of the total squared change sum ||dW||^2 held by the k busiest layers.

Writes ``<out>/layers.json`` and ``layers.md`` (rewritten after every victim).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from core import RESULTS
from core.events import Done, Message, Progress, never, run_with_progress_bar
from core.faces import metrics

ORDERS = ("busiest", "laziest", "random")
LORA_KS = (1, 3, 10, 30)
FULL_KS = (1, 10, 50, 150)


@dataclass
class LayersStudyConfig:
    n: int = 20  # victims for the LoRA rows
    full_n: int = 5  # victims for the full fine-tune rows (0: none)
    full_steps: int = 80  # steps of each full fine-tune
    ks: tuple[int, ...] = LORA_KS  # layer counts k kept of each LoRA
    full_ks: tuple[int, ...] = FULL_KS  # layer counts k kept of each full fine-tune

    def __post_init__(self):
        self.ks, self.full_ks = tuple(int(k) for k in self.ks), tuple(int(k) for k in self.full_ks)
        if self.n < 0 or self.full_n < 0 or self.full_steps < 1:
            raise ValueError(
                f"n >= 0, full_n >= 0, full_steps >= 1; got {self.n!r}, {self.full_n!r}, {self.full_steps!r}"
            )
        for name, ks in (("ks", self.ks), ("full_ks", self.full_ks)):
            if not ks or min(ks) < 1:
                raise ValueError(f"{name}: one or more layer counts >= 1, got {ks!r}")


def orders(changes, seed: int) -> dict[str, list]:
    """The layers in each selection order: by relative change, largest first / smallest first, and a
    seeded random permutation."""
    from core.layers.change import rank_layers

    busy = rank_layers(changes)[0]
    shuffled = list(busy)
    random.Random(seed).shuffle(shuffled)
    return {"busiest": busy, "laziest": busy[::-1], "random": shuffled}


def lora_rows(pipe, lora: dict, trigger: str, photos, ks, floor, seed: int) -> dict:
    """{"all", "concentration": {k}, "<order>": {k: distance}} of one LoRA."""
    from core.faces.utility import lora_utility
    from core.layers.change import concentration, lora_layer_change
    from core.layers.swap import keep_top_k

    changes = lora_layer_change(pipe, lora)
    out = {
        "layers": len(changes),
        "all": lora_utility(pipe, lora, trigger, photos, floor=floor).distance,
        "concentration": {k: concentration(changes, k) for k in ks},
    }
    for name, ranking in orders(changes, seed).items():
        out[name] = {
            k: lora_utility(pipe, keep_top_k(lora, ranking, k), trigger, photos, floor=floor).distance for k in ks
        }
    return out


def full_rows(pipe, photos, ks, floor, seed: int, steps: int) -> dict:
    """The same for a full fine-tune of the UNet (``steps`` steps, seed ``seed``)."""
    from core.events import drain
    from core.faces.utility import EVAL_SEEDS, GUIDANCE, identity_distance
    from core.finetune.full import full_finetune
    from core.layers.change import base_state, concentration, full_layer_change, pipeline_with_state
    from core.layers.swap import full_keep_top_k
    from core.model.pipeline import sample_images
    from core.model.prompts import instance_prompt

    res = drain(full_finetune(pipe, photos, steps=steps, seed=seed))
    w0 = base_state(pipe)
    changes = full_layer_change(w0, res.state)

    def distance(state):
        ims = sample_images(
            pipeline_with_state(pipe, state), instance_prompt(res.trigger), seed=list(EVAL_SEEDS), guidance=GUIDANCE
        )
        return identity_distance(ims, photos)

    out = {
        "layers": len(changes),
        "all": distance(res.state),
        "seconds": round(res.seconds, 1),
        "concentration": {k: concentration(changes, k) for k in ks},
    }
    for name, ranking in orders(changes, seed).items():
        out[name] = {k: distance(full_keep_top_k(w0, res.state, ranking, k)) for k in ks}
    return out


def summarize(per_victim: list[dict], floors: list[float], ks) -> dict:
    """Mean distance [95 % CI] and share of the whole fine-tune's gain kept, per order and k."""
    f = np.asarray(floors[: len(per_victim)])
    d_all = np.array([v["all"] for v in per_victim])
    gain_all = float((f - d_all).mean())
    out = {
        "n": len(per_victim),
        "floor": float(f.mean()),
        "all": float(d_all.mean()),
        "all_ci": metrics.bootstrap_ci(d_all),
        "layers": per_victim[0]["layers"] if per_victim else 0,
        "concentration": {str(k): float(np.mean([v["concentration"][k] for v in per_victim])) for k in ks},
    }
    for name in ORDERS:
        out[name] = {}
        for k in ks:
            d = np.array([v[name][k] for v in per_victim])
            out[name][str(k)] = {
                "distance": float(d.mean()),
                "ci": metrics.bootstrap_ci(d),
                "kept": float((f - d).mean() / gain_all) if gain_all > 0 else None,
            }
    return out


def to_markdown(r: dict) -> str:
    lines = [f"# Busy and lazy layers: what survives with only k layers ({r['created']})", "", f"`{r['command']}`", ""]
    if not r.get("complete"):
        lines += ["**Incomplete run**: stopped before every victim was measured.", ""]
    lines += [
        "Distance: dlib distance of 4 samples with the true trigger to the victim's 5 private photos (lower = "
        "closer). *Kept*: share of the whole fine-tune's gain over the floor that the reduced model keeps. "
        "*Concentration*: share of the fine-tune's total squared change held by its k busiest layers.",
        "",
    ]
    for part, title in (("lora", "Default-recipe LoRA"), ("full", "Full fine-tune of the UNet")):
        s = r.get(part)
        if not s or not s["n"]:
            continue
        lines += [
            f"## {title} ({s['n']} victims, {s['layers']} layers)",
            "",
            f"Whole fine-tune: {s['all']:.3f} [{s['all_ci'][0]:.3f}, {s['all_ci'][1]:.3f}]; floor (base model, "
            f"class prompt): {s['floor']:.3f}.",
            "",
            "| k layers kept | concentration | busiest k: distance (kept) | laziest k | random k |",
            "|---|---|---|---|---|",
        ]
        for k in s["concentration"]:
            cells = []
            for name in ORDERS:
                x = s[name][k]
                kept = "" if x["kept"] is None else f" ({x['kept']:.0%})"
                cells.append(f"{x['distance']:.3f}{kept}")
            lines.append(f"| {k} | {s['concentration'][k]:.0%} | " + " | ".join(cells) + " |")
        lines.append("")
    if r.get("conclusion"):
        lines += ["**Conclusion.** " + r["conclusion"], ""]
    return "\n".join(lines)


def load_report(path: str | Path | None = None) -> dict | None:
    """The last run's results (``docs/results/layers.json``), or None where none was run."""
    from core import load_report as read

    return read("layers", path)


def headline_k(s: dict) -> tuple[str | None, bool]:
    """(the k to quote of one part's summary: the smallest whose busiest layers keep half the gain, else
    the largest below every layer; whether it keeps half). (None, False) when nothing was measured."""
    ks = [k for k in s["concentration"] if s["busiest"][k]["kept"] is not None and int(k) < s["layers"]]
    k = next((k for k in ks if s["busiest"][k]["kept"] >= 0.5), None)
    return (k, True) if k is not None else (ks[-1] if ks else None, False)


def conclusion(r: dict) -> str:
    parts = []
    for part, title in (("lora", "LoRA"), ("full", "full fine-tune")):
        s = r.get(part)
        if not s or not s["n"]:
            continue
        k, half = headline_k(s)
        if k is None:
            continue
        head = f"For the {title} ({s['n']} victims), "
        if not half:
            head += "no k tried keeps half of the fine-tune's gain with the busiest layers alone; at the largest, "
        b, l_, rnd = s["busiest"][k], s["laziest"][k], s["random"][k]
        parts.append(
            head + f"the {k} busiest of {s['layers']} layers (holding "
            f"{s['concentration'][k]:.0%} of the change) keep {b['kept']:.0%} of its gain over the floor "
            f"(distance {b['distance']:.3f} vs {s['all']:.3f} for every layer and {s['floor']:.3f} for the floor); "
            f"the {k} laziest keep {l_['kept']:.0%}, {k} random layers {rnd['kept']:.0%}."
        )
    return " ".join(parts)


@dataclass
class LayersResult:
    """Per victim the rows of :func:`lora_rows` and :func:`full_rows`, and the floor distances."""

    ks: tuple
    full_ks: tuple
    floors: list  # per victim: the floor's distance to its photos
    per_lora: list = field(default_factory=list)
    per_full: list = field(default_factory=list)
    complete: bool = False
    base: str = ""  # the base model's fingerprint (core.model.prior.base_fingerprint)


def report(res: LayersResult, command: str, created: str, minutes: float) -> dict:
    """The JSON of the study (``layers.json``): summaries, conclusion, then the per-victim rows."""
    r = {
        "command": command,
        "created": created,
        "base": res.base,
        "complete": res.complete,
        "lora": summarize(res.per_lora, res.floors, res.ks) if res.per_lora else None,
        "full": summarize(res.per_full, res.floors, res.full_ks) if res.per_full else None,
    }
    r["conclusion"] = conclusion(r)
    r["minutes"] = minutes
    return r | {"per_victim": {"lora": res.per_lora, "full": res.per_full}}


def row_text(part: str, i: int, n: int, name: str, v: dict, floor: float, ks) -> str:
    return f"{part} {i + 1}/{n} {name:<26} all {v['all']:.3f} floor {floor:.3f}  " + "  ".join(
        f"k={k}: busy {v['busiest'][k]:.3f} lazy {v['laziest'][k]:.3f} rnd {v['random'][k]:.3f}" for k in ks
    )


def run(cfg: LayersStudyConfig, model=None, root=None, save=lambda res: None, should_stop=never):
    """The study as a job: the victims' LoRAs (cached, as the attack study's), then a Progress per LoRA
    victim and per full fine-tune, ``save(result so far)`` after each; Done(LayersResult) (on a stop:
    what was measured, ``complete`` False, cancelled)."""
    from core.faces.utility import floor_images, identity_distance
    from core.model.pipeline import image_size_of, load_pipeline
    from core.model.prior import base_fingerprint
    from core.studies.attack import crops_of, identities, train_victim_loras, victim_recipe

    # 1. the base model, the victims, their LoRAs and the floor
    pipe = load_pipeline(model)
    names, people = identities("victims", max(cfg.n, cfg.full_n), root)
    private = crops_of(names, people, image_size_of(pipe))
    recipe = victim_recipe()
    loras = yield from train_victim_loras(pipe, names[: cfg.n], private[: cfg.n], recipe, should_stop=should_stop)
    if loras is None:
        yield Done(None, cancelled=True)
        return
    floor = floor_images(pipe)
    res = LayersResult(cfg.ks, cfg.full_ks, [identity_distance(floor, p) for p in private], base=base_fingerprint(pipe))
    # 2. the LoRA rows, then the full fine-tune rows, saved after each victim
    t0 = time.perf_counter()
    for i, lo in enumerate(loras):
        if should_stop():
            yield Done(res, cancelled=True)
            return
        lora = lo["checkpoints"][recipe.steps]
        res.per_lora.append(lora_rows(pipe, lora, lo["trigger"], private[i], cfg.ks, floor, seed=i))
        yield Message(row_text("LoRA", i, len(loras), names[i], res.per_lora[-1], res.floors[i], cfg.ks))
        yield Progress("LoRA victims", i + 1, len(loras), time.perf_counter() - t0, {"all": res.per_lora[-1]["all"]})
        save(res)
    for i in range(cfg.full_n):
        if should_stop():
            yield Done(res, cancelled=True)
            return
        res.per_full.append(full_rows(pipe, private[i], cfg.full_ks, floor, seed=i, steps=cfg.full_steps))
        yield Message(row_text("full", i, cfg.full_n, names[i], res.per_full[-1], res.floors[i], cfg.full_ks))
        yield Progress("full fine-tunes", i + 1, cfg.full_n, time.perf_counter() - t0, {"all": res.per_full[-1]["all"]})
        save(res)
    res.complete = True
    save(res)
    yield Done(res)


@dataclass
class Args(LayersStudyConfig):
    """Do the busiest layers carry the fine-tune?"""

    out: str = str(RESULTS)  # folder of layers.json and layers.md
    data: str | None = None  # LFW folder (None: $LEAKLAB_LFW or ../shared/data/lfw-deepfunneled)
    model: str | None = None  # base model folder or hub id (None: the embedded one)


def main(argv=None):
    from core.cli import command_line, config_of, parse

    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(Args, argv, description=__doc__.split("\n")[0])
    cfg = config_of(a, LayersStudyConfig)
    t0 = time.perf_counter()
    out = Path(a.out)
    head = dict(
        command=command_line("core.studies.layers", argv),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )

    def save(res):
        r = report(res, **head, minutes=round((time.perf_counter() - t0) / 60, 1))
        out.mkdir(parents=True, exist_ok=True)
        (out / "layers.json").write_text(json.dumps(r, indent=1) + "\n")
        (out / "layers.md").write_text(to_markdown(r))

    res = run_with_progress_bar(run(cfg, a.model, a.data, save))
    if res is not None:
        print(to_markdown(report(res, **head, minutes=round((time.perf_counter() - t0) / 60, 1))))


if __name__ == "__main__":
    main()
