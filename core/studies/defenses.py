"""What each defense costs: privacy against utility of a shared LoRA. ``python -m core.studies.defenses``.

Protocol (docs/EVAL, as :mod:`core.studies.attack`), on the first ``--n`` victim identities (never seen by
the base model, the shadow population or the attacker), each with its 5 private photos:
- undefended: each victim's LoRA from the default recipe (:func:`core.studies.attack.train_victim_loras`:
  the same cached LoRAs as the attack evaluation);
- post-hoc defenses: every defense of :data:`core.defenses.posthoc.DEFENSES` at each of its strengths,
  applied to that LoRA (:func:`core.defenses.posthoc.apply_defense`);
- DP-SGD: a fresh fine-tune of each victim with :func:`core.defenses.dp.dp_finetune` (same recipe, seed
  and photos) per noise multiplier; epsilon is its RDP accountant's, per photo (cached per base model,
  so reruns reuse them);
- the scores of every point are cached (keyed by everything scored: base, attacker, victims, recipe,
  defense and the LoRAs themselves), so a rerun with more points, or after a stop, scores only what is new;
- each point is scored twice, per victim:
  *attack*: the shipped weight-only attacker (``assets/attacker/attacker.safetensors``) reads the
  (defended) LoRA and its model draws 4 images (:func:`core.attack.report.reconstruct_lora`); mean
  dlib descriptor -> distance to the victim's gallery entry (mean of the private photos), rank among
  the N victims (top-1 / top-5): :func:`core.studies.attack.summarize`;
  *utility*: the (defended) LoRA's own 4 samples with its true trigger, distance to the same photos
  (:func:`core.faces.utility.lora_utility`);
- the floor: the base model with the class prompt (a random face; no LoRA), scored both ways. A point
  counts as "at the floor" when the 95 % bootstrap interval of the per-victim gain over the floor
  (floor distance - distance) reaches 0: with N victims, no measurable advantage over a random face.

Writes ``<out>/defenses.json``, ``defenses.md`` (table and a conclusion generated from the numbers)
and ``defenses_chart.json`` (plotly figure of :func:`core.plots.privacy_utility_plot`, ``to_json``).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from core import PROJECT_ROOT, RESULTS
from core.attack.attacker import ATTACK_SAMPLER_STEPS, ATTACK_W, ATTACKER_DIR
from core.attack.report import attacker_mismatch, reconstruct_lora
from core.cache import cached
from core.cli import Switch
from core.defenses.dp import DPConfig, dp_finetune
from core.defenses.posthoc import DEFENSES, apply_defense
from core.events import Done, Message, Progress, drain, never, run_with_progress_bar
from core.faces import aligned, metrics
from core.faces.utility import describe_set, floor_images, lora_utility
from core.finetune.lora import FinetuneConfig
from core.model.prior import base_fingerprint, cache_dir
from core.studies.attack import VICTIM_SEED0, identities, summarize, train_victim_loras, victim_recipe

# DP-SGD noise multipliers of the study (5 photos, 80 steps: epsilon per photo in docs/results/defenses.md);
# sigma 0 clips each photo's gradient without noise (no privacy): it separates what clipping costs from what noise
# costs.
# Larger sigmas (4, 8: epsilon 4.4, 2.0) are left out: from sigma 0.25 on, attack and utility are both at the floor
DP_NOISE = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
PHOTOS = 5  # private photos per victim (eval_attack's protocol)
UNDEFENDED, FLOOR, DP = "none", "floor", "dp_sgd"
TITLES = {
    "weight_noise": "weight noise",
    "prune": "pruning",
    "quantize": "quantization",
    "rank_truncate": "rank truncation",
    DP: "DP-SGD fine-tune",
    UNDEFENDED: "undefended LoRA",
    FLOOR: "floor (no LoRA: a random face)",
}


@dataclass
class DefensesStudyConfig:
    n: int = 20  # victims (the first N of the split, as the attack study)
    defenses: tuple[Literal[tuple(DEFENSES)], ...] | None = None  # post-hoc defenses (None: all; the flag alone: none)
    skip_dp: Switch = False  # no DP-SGD points (each is a fresh fine-tune per victim)
    dp_noise: tuple[float, ...] = DP_NOISE  # DP-SGD noise multipliers

    def __post_init__(self):
        self.dp_noise = tuple(float(s) for s in self.dp_noise)
        if self.n < 2:
            raise ValueError(f"n must be at least 2 (top-1 ranks the victims against each other), got {self.n!r}")
        posthoc_points(self.defenses)  # its own check of the names
        if any(s < 0 for s in self.dp_noise):
            raise ValueError(f"dp_noise: noise multipliers are >= 0, got {self.dp_noise!r}")


def strength_text(name: str, s) -> str:
    """A strength in words, short enough for a chart label."""
    if name == "weight_noise":
        return f"noise {s:g}x RMS"
    if name == "prune":
        return f"{100 * s:g} % zeroed"
    if name == "quantize":
        return f"{int(s)} bits"
    if name == "rank_truncate":
        return f"keep {int(s)}"
    if name == DP:
        return f"sigma {s:g}" + (" (clipping only)" if s == 0 else "")
    return ""


@dataclass
class Victims:
    """The people of the study: their private photos and their undefended LoRAs."""

    names: list
    private: list  # per victim: its private crops (uint8 H x W x 3)
    loras: list  # per victim: its final undefended LoRA (peft naming, component prefix)
    triggers: list  # per victim: the LoRA's true trigger word
    seeds: list  # per victim: the seed its LoRA was trained with (DP-SGD reuses it)

    def __post_init__(self):
        if not len(self.names) == len(self.private) == len(self.loras) == len(self.triggers) == len(self.seeds):
            raise ValueError("names, private, loras, triggers and seeds must have one entry per victim")
        if len(self.names) < 2:
            raise ValueError("the study needs at least 2 victims (top-1 ranks them against each other)")


def load_victims(pipe, n: int, root=None, should_stop=never):
    """Step of a job: the first ``n`` victims with >= 5 photos, their 5 private photos and cached LoRAs
    (as the attack study); returns Victims, or None when stopped."""
    from core.model.pipeline import image_size_of

    names, people = identities("victims", n, root)

    # at the model's resolution: 64 px for the embedded model, as eval_attack loads them
    private = [list(aligned.load_crops(people[v][:PHOTOS], size=image_size_of(pipe))) for v in names]
    cfg = victim_recipe()
    loras = yield from train_victim_loras(pipe, names, private, cfg, should_stop=should_stop)
    if loras is None:
        return None
    return Victims(
        names,
        private,
        [lo["checkpoints"][cfg.steps] for lo in loras],
        [lo["trigger"] for lo in loras],
        [VICTIM_SEED0 + i for i in range(len(names))],
    )


def posthoc_points(names=None) -> list[tuple[str, float]]:
    """(defense, strength) of every post-hoc point of the study, weakest first per defense."""
    names = list(DEFENSES) if names is None else list(names)
    unknown = [n for n in names if n not in DEFENSES]
    if unknown:
        raise ValueError(f"unknown defense(s) {unknown}; known: {', '.join(DEFENSES)}")
    return [(n, s) for n in names for s in DEFENSES[n].strengths]


# DP-SGD LoRAs, cached -----------------------------------------------------------------------------


def dp_victim_lora(pipe, photos, name: str, seed: int, cfg: FinetuneConfig, dp: DPConfig):
    """Step of a job: {"lora", "trigger", "epsilon", "noise_multiplier", "sample_rate", "steps"} of a DP-SGD
    fine-tune of one victim (seed ``seed``), a Message when it was trained; cached per base model and per
    (victim, photos, recipe, DP settings)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = replace(cfg, seed=int(seed), checkpoint_every=0, preview_n=0)
    key = hashlib.sha256(json.dumps([name, asdict(cfg), asdict(dp)], sort_keys=True, default=str).encode())
    for p in photos:
        key.update(np.ascontiguousarray(p, np.uint8).tobytes())
    path = cache_dir() / "dp_victims" / base_fingerprint(pipe) / f"{key.hexdigest()[:24]}.safetensors"
    if path.exists():
        with safe_open(str(path), "pt") as h:
            meta = h.metadata()
            lora = {k: h.get_tensor(k).float() for k in h.keys()}
        return dict(
            lora=lora,
            trigger=meta["trigger"],
            epsilon=float(meta["epsilon"]),
            noise_multiplier=float(meta["noise_multiplier"]),
            sample_rate=float(meta["sample_rate"]),
            steps=int(meta["steps"]),
        )
    t0 = time.perf_counter()
    res = drain(dp_finetune(pipe, photos, cfg, dp))
    out = dict(
        lora=res.lora,
        trigger=res.trigger,
        epsilon=float(res.epsilon),
        noise_multiplier=float(res.noise_multiplier),
        sample_rate=float(res.sample_rate),
        steps=int(res.steps_done),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in res.lora.items()},
        str(path),
        metadata={k: str(v) for k, v in out.items() if k != "lora"} | {"identity": name},
    )
    yield Message(f"  DP-SGD LoRA of {name} (sigma {out['noise_multiplier']:g}): {time.perf_counter() - t0:.0f} s")
    return out


# scoring ------------------------------------------------------------------------------------------


def score_lora(
    pipe, attacker, lora: dict, step: int, alpha: float, trigger: str, photos, floor_ims
) -> tuple[np.ndarray, float]:
    """(mean descriptor of the attacker's 4 reconstructions, utility distance) of one LoRA."""
    attack = describe_set(reconstruct_lora(pipe, attacker, lora, step, alpha))
    return attack, lora_utility(pipe, lora, trigger, photos, alpha=alpha, floor=floor_ims).distance


def _gain(values: np.ndarray) -> dict:
    lo, hi = metrics.bootstrap_ci(values)
    return dict(mean=float(np.mean(values)), ci=[float(lo), float(hi)])


def make_row(
    defense: str,
    strength,
    attack_desc: np.ndarray,
    utility_d,
    gallery: np.ndarray,
    floor_d: np.ndarray,
    seconds: float = 0.0,
    **extra,
) -> dict:
    """One point of the study: the attack (``summarize``) and the utility over the victims, each with
    its per-victim gain over the floor (floor distance - distance) and whether that gain is measurable."""
    attack_desc = np.asarray(attack_desc, np.float64)
    ud = np.asarray(utility_d, np.float64)
    ad = metrics.distance(attack_desc, gallery)
    att = summarize(attack_desc, gallery)
    a_gain, u_gain = _gain(floor_d - ad), _gain(floor_d - ud)
    lo, hi = metrics.bootstrap_ci(ud)
    short = strength_text(defense, strength) if strength is not None else ""
    title = TITLES.get(defense, defense)
    return dict(
        defense=defense,
        strength=strength,
        title=title,
        short=short,
        label=f"{title}, {short}" if short else title,
        meaning=DEFENSES[defense].label if defense in DEFENSES else "",
        attack=att,
        attack_gain=a_gain,
        attack_at_floor=bool(a_gain["ci"][0] <= 0),
        utility=dict(
            distance=float(ud.mean()),
            distance_ci=[float(lo), float(hi)],
            beats_floor=float((ud < floor_d).mean()),
            same_person=float((ud < metrics.SAME_PERSON).mean()),
            per_victim_distance=[round(float(x), 4) for x in ud],
        ),
        utility_gain=u_gain,
        utility_at_floor=bool(u_gain["ci"][0] <= 0),
        seconds=round(float(seconds), 1),
        **extra,
    )


@dataclass
class Scoring:
    """What every point of the study is scored with: the victims, the attacker, the recipe of their
    LoRAs and the floor (the base model's class-prompt samples)."""

    pipe: object
    attacker: object
    victims: Victims
    cfg: FinetuneConfig
    gallery: np.ndarray  # per victim: the mean descriptor of its private photos
    floor_ims: list
    floor_desc: np.ndarray
    floor_d: np.ndarray  # per victim: the floor's distance


def scoring(pipe, attacker, victims: Victims, cfg: FinetuneConfig) -> Scoring:
    gallery = np.stack([describe_set(p) for p in victims.private])
    floor_ims = floor_images(pipe)
    floor_desc = describe_set(floor_ims)
    return Scoring(pipe, attacker, victims, cfg, gallery, floor_ims, floor_desc, metrics.distance(floor_desc, gallery))


def score_point(sc: Scoring, defense: str, strength, loras, steps, triggers, **extra) -> dict:
    """The row of one point: every victim's (defended) LoRA scored, or its scores from the cache."""
    t0 = time.perf_counter()
    v = sc.victims

    def measure():
        descs, util = [], []
        for i in range(len(v.names)):
            d, u = score_lora(
                sc.pipe, sc.attacker, loras[i], steps[i], sc.cfg.alpha, triggers[i], v.private[i], sc.floor_ims
            )
            descs.append(d)
            util.append(u)
        return {
            "attack_desc": np.stack(descs).tolist(),
            "utility_distance": [float(u) for u in util],
            "seconds": time.perf_counter() - t0,
        }

    # keyed by everything scored, so a rerun with more points (or after a stop) scores only what is new
    hit = cached(
        "defense_points",
        [
            base_fingerprint(sc.pipe),
            v.names,
            asdict(sc.cfg),
            defense,
            strength,
            ATTACK_W,
            ATTACK_SAMPLER_STEPS,
            sc.attacker.state_dict(),
            v.private,
            loras,
        ],
        measure,
    )
    descs, util, secs = np.asarray(hit["attack_desc"]), hit["utility_distance"], hit["seconds"]
    return make_row(defense, strength, descs, util, sc.gallery, sc.floor_d, secs, **extra)


def defended_loras(
    pipe, victims: Victims, cfg: FinetuneConfig, defense: str, strength, dp: DPConfig, should_stop=never
):
    """Step of a job: (the victims' LoRAs at one point of the study, their step counts, their triggers,
    the row's extra fields). A DP-SGD point trains a fresh LoRA per victim (cached; a Progress each).
    Returns None when stopped."""
    n = len(victims.names)
    if defense == UNDEFENDED:
        return victims.loras, [cfg.steps] * n, victims.triggers, {}
    if defense != DP:
        return [apply_defense(lo, defense, strength) for lo in victims.loras], [cfg.steps] * n, victims.triggers, {}
    dpc = DPConfig(noise_multiplier=float(strength), max_grad_norm=dp.max_grad_norm, delta=dp.delta)
    runs, t0 = [], time.perf_counter()
    for i in range(n):
        if should_stop():
            return None
        runs.append((yield from dp_victim_lora(pipe, victims.private[i], victims.names[i], victims.seeds[i], cfg, dpc)))
        yield Progress(f"DP-SGD LoRAs (sigma {strength:g})", i + 1, n, time.perf_counter() - t0)
    eps = [r["epsilon"] for r in runs]
    extra = dict(
        noise_multiplier=float(strength),
        epsilon=None if not all(map(math.isfinite, eps)) else max(eps),
        photos_per_victim=max(len(p) for p in victims.private),
        sample_rate=runs[0]["sample_rate"],
        max_grad_norm=dp.max_grad_norm,
        delta=dp.delta,
    )
    return [r["lora"] for r in runs], [r["steps"] for r in runs], [r["trigger"] for r in runs], extra


def row_text(row: dict) -> str:
    return (
        f"{row['label']:<38} attack {row['attack']['distance']:.3f} (top-1 {row['attack']['top1']:.0%}, "
        f"gain over floor {row['attack_gain']['mean']:+.3f})   utility {row['utility']['distance']:.3f} "
        f"(gain {row['utility_gain']['mean']:+.3f})   {row['seconds']:.0f} s"
    )


@dataclass
class DefensesResult:
    """The study's points: undefended, post-hoc points..., DP points..., floor (rows of :func:`make_row`)."""

    n: int
    chance_top1: float
    chance_top5: float
    rows: list


def run_study(
    pipe,
    attacker,
    victims: Victims,
    cfg: FinetuneConfig | None = None,
    points=None,
    dp_noise=DP_NOISE,
    dp: DPConfig | None = None,
    should_stop=never,
):
    """Job: every point of the study on ``victims`` (their LoRAs trained with recipe ``cfg``), a Progress
    per point; Done(DefensesResult) (on a stop: the points measured so far and the floor, cancelled).
    ``points``: (defense, strength) pairs (default: all of :data:`DEFENSES`); ``dp_noise``: DP-SGD noise
    multipliers (empty: no DP points); ``dp``: the other DP settings (clip, delta)."""
    cfg = cfg or victim_recipe()
    points = posthoc_points() if points is None else list(points)
    dp = dp or DPConfig()
    why = attacker_mismatch(attacker, victims.loras[0])
    if why:
        raise ValueError(why)
    n = len(victims.names)
    sc = scoring(pipe, attacker, victims, cfg)
    plan = [(UNDEFENDED, None), *points, *((DP, float(sigma)) for sigma in dp_noise)]
    rows, t0, cancelled = [], time.perf_counter(), False
    for defense, strength in plan:
        got = (
            None
            if should_stop()
            else (yield from defended_loras(pipe, victims, cfg, defense, strength, dp, should_stop))
        )
        if got is None:
            cancelled = True
            break
        loras, steps, triggers, extra = got
        rows.append(score_point(sc, defense, strength, loras, steps, triggers, **extra))
        yield Message(row_text(rows[-1]))
        yield Progress(
            "defense points",
            len(rows),
            len(plan),
            time.perf_counter() - t0,
            {"attack": rows[-1]["attack"]["distance"], "utility": rows[-1]["utility"]["distance"]},
        )
    rows.append(make_row(FLOOR, None, np.repeat(sc.floor_desc[None], n, 0), sc.floor_d, sc.gallery, sc.floor_d))
    yield Done(DefensesResult(n=n, chance_top1=1 / n, chance_top5=min(1.0, 5 / n), rows=rows), cancelled=cancelled)


def run(pipe, attacker, cfg: DefensesStudyConfig, root=None, should_stop=never):
    """The study as a job: the victims' LoRAs (cached, as the attack study's), then every point of ``cfg``
    (:func:`run_study`); Done(DefensesResult)."""
    victims = yield from load_victims(pipe, cfg.n, root, should_stop)
    if victims is None:
        yield Done(None, cancelled=True)
        return
    yield from run_study(
        pipe,
        attacker,
        victims,
        victim_recipe(),
        posthoc_points(cfg.defenses),
        () if cfg.skip_dp else cfg.dp_noise,
        should_stop=should_stop,
    )


# reporting ----------------------------------------------------------------------------------------


def _ci(v: dict, key: str = "distance") -> str:
    lo, hi = v[f"{key}_ci"]
    return f"{v[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _gain_text(g: dict) -> str:
    return f"{g['mean']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]"


def _eps_text(r: dict) -> str:
    if r["defense"] != DP:
        return ""
    if r.get("epsilon") is None:
        return "inf"
    return f"{r['epsilon']:.3g}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _undefended_sentences(result: dict, und: dict, flo: dict) -> list[str]:
    """The undefended LoRA against the floor: what the attack and the LoRA itself achieve without a defense."""
    n = result["n"]
    out = [
        f"On {n} victims, the attacker's reconstructions from the undefended LoRA are at distance "
        f"{und['attack']['distance']:.3f} from the victims' photos (top-1 {und['attack']['top1']:.0%} among the {n}, "
        f"chance {result['chance_top1']:.0%}); a random face from the base model is at {flo['attack']['distance']:.3f} "
        f"(the floor), and the LoRA's own samples with its trigger at {und['utility']['distance']:.3f}."
    ]
    if und["attack_at_floor"]:
        out.append(
            f"The undefended attack is not measurably closer to the victims than the floor here (per-victim gain "
            f"{_gain_text(und['attack_gain'])}, 95 % interval reaching 0), so there is little for a defense to "
            "remove: the points below mostly show what each defense costs the LoRA."
        )
    else:
        out.append(
            f"The undefended attack beats the floor by {_gain_text(und['attack_gain'])} per victim (95 % interval)."
        )
    if und["utility_at_floor"]:
        out.append(
            "The undefended LoRA itself is not measurably closer to the victims than the floor with its trigger, "
            "so its utility has little room to drop."
        )
    return out


def _eps_words(p: dict) -> str:
    """A DP point's epsilon, per photo and for the person (empty for other defenses)."""
    if p["defense"] != DP or p.get("epsilon") is None:
        return ""
    return (
        f" (epsilon {_eps_text(p)} per photo; roughly {p['photos_per_victim']}x that, "
        f"{p['photos_per_victim'] * p['epsilon']:.3g}, for a person with {p['photos_per_victim']} photos)"
    )


def _defense_sentence(name: str, pts: list[dict]) -> str:
    """Where a defense first brings the attack to the floor, and what the LoRA keeps there (or its strongest point)."""
    first = next((p for p in pts if p["attack_at_floor"]), None)
    if first is not None:
        left = (
            "no longer measurably better than a random face"
            if first["utility_at_floor"]
            else f"still closer to the person than the floor by {first['utility_gain']['mean']:.3f}"
        )
        return (
            f"{_cap(TITLES[name])} first brings the attack to the floor at {first['short']}{_eps_words(first)}: "
            f"attack distance {first['attack']['distance']:.3f}, top-1 {first['attack']['top1']:.0%}; the LoRA's "
            f"own samples are then at {first['utility']['distance']:.3f}, {left}."
        )
    last = pts[-1]
    return (
        f"{_cap(TITLES[name])} never brings the attack to the floor within the strengths tried; at "
        f"its strongest, {last['short']}{_eps_words(last)}, the attack is at {last['attack']['distance']:.3f} "
        f"(gain over the floor {last['attack_gain']['mean']:+.3f}) and the LoRA at "
        f"{last['utility']['distance']:.3f}."
    )


def _trade_off_sentence(groups: dict[str, list], und: dict, flo: dict) -> str | None:
    """The best point with the attack at the floor and the LoRA still useful; None when no sentence applies."""
    both = [r for ps in groups.values() for r in ps if r["attack_at_floor"] and not r["utility_at_floor"]]
    if both:
        best = min(both, key=lambda r: r["utility"]["distance"])
        return (
            "Best trade-off measured: "
            f"{best['label']}{' (epsilon ' + _eps_text(best) + ' per photo)' if best['defense'] == DP else ''}, with "
            "the attack at the floor and the LoRA still closer to the person than a random face "
            f"({best['utility']['distance']:.3f} against {flo['utility']['distance']:.3f})"
            + (
                f"; but it keeps only {best['utility_gain']['mean'] / und['utility_gain']['mean']:.0%} of the "
                f"undefended LoRA's gain over the floor ({best['utility_gain']['mean']:+.3f} of "
                f"{und['utility_gain']['mean']:+.3f})."
                if und["utility_gain"]["mean"] > 0
                else "."
            )
        )
    if groups and not und["attack_at_floor"]:
        return (
            "No point measured here brings the attack to the floor while keeping the LoRA measurably better than a "
            "random face: on this data, hiding the person from the attacker costs the LoRA its use."
        )
    return None


def conclusion(result: dict) -> str:
    """A few sentences read off the numbers (nothing here is fixed in advance)."""
    rows = result["rows"]
    und = next(r for r in rows if r["defense"] == UNDEFENDED)
    flo = next(r for r in rows if r["defense"] == FLOOR)
    out = _undefended_sentences(result, und, flo)
    groups: dict[str, list] = {}
    for r in rows:
        if r["defense"] not in (UNDEFENDED, FLOOR):
            groups.setdefault(r["defense"], []).append(r)
    out += [_defense_sentence(name, pts) for name, pts in groups.items()]
    trade_off = _trade_off_sentence(groups, und, flo)
    if trade_off:
        out.append(trade_off)
    out.append(
        f'"At the floor" means not measurably better than a random face with {result["n"]} victims (95 % bootstrap '
        "interval of the per-victim gain reaching 0), not that nothing leaks."
    )
    return " ".join(out)


def table_markdown(result: dict) -> str:
    lines = [
        "| defense | strength | epsilon (per photo) | attack: distance [95 % CI] | top-1 | top-5 | attack gain over "
        "floor | LoRA with trigger: distance [95 % CI] | LoRA beats floor (victims) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        a, u = r["attack"], r["utility"]
        lines.append(
            f"| {r['title']} | {r['short']} | {_eps_text(r)} | {_ci(a)} | {a['top1']:.0%} | {a['top5']:.0%} | "
            f"{_gain_text(r['attack_gain'])}{' (at floor)' if r['attack_at_floor'] and r['defense'] != FLOOR else ''} "
            f"| {_ci(u)} | {u['beats_floor']:.0%} |"
        )
    return "\n".join(lines)


def to_markdown(r: dict) -> str:
    head = (
        f"Privacy against utility of the LoRA defenses on {r['n']} victims (chance: top-1 {r['chance_top1']:.0%}, "
        f"top-5 {r['chance_top5']:.0%}); base {r.get('base', '?')}; attacker `{r.get('attacker', '?')}`. Produced by "
        f"`{r.get('command', 'python -m core.studies.defenses')}` on {r.get('created', '?')}."
    )
    expl = (
        "Distances are dlib descriptor distances of the mean face of 4 images to the victim's private photos "
        "(lower = more alike; same person < 0.6). *Attack*: the weight-only attacker's reconstruction from the "
        "(defended) LoRA; higher = more private. *LoRA with trigger*: the (defended) LoRA's own samples with its "
        "true trigger; lower = the LoRA still does its job. *Gain over floor*: per-victim floor distance minus "
        'distance, mean and 95 % bootstrap interval; "at floor" when the interval reaches 0. Epsilon is DP-SGD\'s, '
        "per photo (a person with k photos in the set has roughly k times that)."
    )
    return "\n\n".join([head, expl, table_markdown(r), "**Conclusion.** " + r.get("conclusion", conclusion(r))]) + "\n"


@dataclass
class Args(DefensesStudyConfig):
    """Privacy-utility study of the LoRA defenses (needs the trained attacker)."""

    out: str = str(RESULTS)  # folder of defenses.json, defenses.md, defenses_chart.json
    attacker: str = str(ATTACKER_DIR / "attacker.safetensors")  # the trained weight-only attacker's file
    data: str | None = None  # LFW folder (None: $LEAKLAB_LFW or ../shared/data/lfw-deepfunneled)
    model: str | None = None  # base model folder or hub id (None: the embedded one)


def load_checked_attacker(pipe, path: Path):
    """(the attacker, its info); SystemExit with a sentence when it is missing or for another base."""
    from core.attack.attacker import load_attacker

    attacker, info = load_attacker(path, pipe.device)
    if attacker.cfg.base != base_fingerprint(pipe):
        raise SystemExit(
            f"The attacker at {path} was trained for another base model ({attacker.cfg.base}; this one "
            f"is {base_fingerprint(pipe)})."
        )
    return attacker, info


def main(argv=None):
    from core.cli import command_line, config_of, parse
    from core.model.pipeline import load_pipeline
    from core.plots import privacy_utility_plot

    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(Args, argv, description="Privacy-utility study of the LoRA defenses (needs the trained attacker)")
    att_path = Path(a.attacker)
    if not att_path.is_file():
        raise SystemExit(
            f"No trained attacker at {att_path}: the study attacks every defended LoRA with it. Train it "
            "first (`python -m core.attack.shadow`, then `python -m core.attack.train`) or pass --attacker PATH."
        )
    cfg = config_of(a, DefensesStudyConfig)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    pipe = load_pipeline(a.model)
    attacker, info = load_checked_attacker(pipe, att_path)
    res = run_with_progress_bar(run(pipe, attacker, cfg, a.data))
    try:
        shown = att_path.resolve().relative_to(PROJECT_ROOT)
    except ValueError:
        shown = att_path
    r = dict(
        command=command_line("core.studies.defenses", argv),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        base=base_fingerprint(pipe),
        attacker=str(shown),
        attacker_info=info,
        recipe=vars(victim_recipe()) | {"unet_targets": list(victim_recipe().unet_targets)},
        seconds=round(time.perf_counter() - t0),
        **asdict(res),
    )
    r["conclusion"] = conclusion(r)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "defenses.json").write_text(json.dumps(r, indent=1, allow_nan=False) + "\n")
    (out / "defenses.md").write_text(to_markdown(r))
    (out / "defenses_chart.json").write_text(privacy_utility_plot(r["rows"]).to_json() + "\n")
    print(to_markdown(r))


if __name__ == "__main__":
    main()
