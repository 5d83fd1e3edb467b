"""Do cloaked photos protect a person from a LoRA fine-tune, and does purification undo it?
``python -m core.studies.cloaking``.

Protocol (docs/EVAL, as :mod:`core.studies.defenses`), on the first ``--n`` victims (never seen by the
base model, the shadow population or the attacker), each with its 5 private photos:
- the photos the LoRA is trained on, per victim: **clean** (the attack and defenses studies' cached
  LoRAs, same seeds); **purified** (clean photos through the purification chain: what purification
  alone costs); **cloaked** at each ``--budgets`` (:func:`core.defenses.cloak.cloak_photos`, the app's
  default cloak at that budget, cached per photo set); **cloaked + purified** (the cloaked photos
  through :func:`core.defenses.purify.purify`, as a determined attacker or an upload pipeline would);
- each photo set gets the default LoRA recipe with the victim's own seed (so two LoRAs of a victim
  differ only by their photos), trained K at a time (:func:`core.attack.shadow.train_many`), cached;
- every LoRA is scored against the victim's **clean** photos (the person, not the pixels trained on):
  *utility*, its own 4 samples with its true trigger (:func:`core.faces.utility.lora_utility`), and
  *attack*, the shipped weight-only attacker's reconstruction (:func:`core.attack.report.reconstruct_lora`,
  ranked among the N victims), both as dlib distances to the victim's gallery entry; scores cached;
- the floor: the base model with the class prompt (a random face). A protection *works* when it pushes
  the LoRA's samples (and the attack) measurably away from the person: per victim, distance of the row
  minus distance of the clean row, with a 95 % bootstrap interval over victims;
- the visible cost: PSNR and SSIM of the photos trained on against the originals (per victim the mean
  over its photos; mean and interval over victims), and the cloak's own measure, its surrogate's
  loss on the cloaked photos over that on the originals.

Writes ``<out>/cloaking.json``, ``cloaking.md`` (table and a conclusion generated from the numbers,
set against the papers' claims) and ``cloaking_chart.json`` (:func:`core.plots.cloaking_plot`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from core import ASSETS, RESULTS
from core.cache import cached, digest
from core.defenses.cloak import SURROGATES, CloakConfig, cloak_photos, psnr, ssim
from core.defenses.purify import PurifyConfig, purify
from core.events import Done, Message, Progress, drain, never, run_with_progress_bar
from core.faces import aligned, metrics
from core.faces.utility import describe_set, floor_images, lora_utility
from core.finetune.lora import FinetuneConfig

CLEAN, PURIFIED, CLOAKED, BOTH, FLOOR = "clean", "purified", "cloaked", "cloaked+purified", "floor"
KIND_TITLES = {
    CLEAN: "clean photos",
    PURIFIED: "purified photos (no cloak)",
    CLOAKED: "cloaked photos",
    BOTH: "cloaked, then purified",
    FLOOR: "floor (no LoRA: a random face)",
}
PHOTOS = 5  # private photos per victim (the attack study's protocol)


@dataclass
class CloakingStudyConfig:
    n: int = 20  # victims (the first N of the split, as the attack and defenses studies)
    budgets: tuple[float, ...] = (4.0, 8.0, 16.0)  # L-infinity budgets of the cloak, on the 0-255 image
    cloak_steps: int = CloakConfig.steps  # PGD steps of each cloak (the app's default)
    surrogate: str = CloakConfig.surrogate  # the cloak's surrogate: lora (ASPL-style) or base (the frozen base only)
    purify: tuple[str, ...] = PurifyConfig.chain  # purification steps, in order (noise, resize, jpeg, blur)
    jpeg_quality: int = PurifyConfig.jpeg_quality  # JPEG quality of the purification
    noise_std: float = PurifyConfig.noise_std  # Gaussian noise std of the purification (0-255 scale)
    resize_factor: float = PurifyConfig.resize_factor  # down-up resize factor of the purification
    steps: int = FinetuneConfig.steps  # fine-tuning steps of every LoRA (the default recipe's)

    def __post_init__(self):
        self.budgets = tuple(float(b) for b in self.budgets)
        self.purify = tuple(self.purify)
        if self.n < 2:
            raise ValueError(f"n must be >= 2 (top-1 ranks the victims against each other), got {self.n!r}")
        if not self.budgets:
            raise ValueError("budgets must name at least one budget")
        for b in self.budgets:
            CloakConfig(budget=b)  # its own check of each budget
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {self.surrogate!r}")
        self.purify_config()
        FinetuneConfig(steps=self.steps)

    def cloak_config(self, budget: float) -> CloakConfig:
        return CloakConfig(budget=float(budget), steps=self.cloak_steps, surrogate=self.surrogate)

    def purify_config(self) -> PurifyConfig:
        return PurifyConfig(
            chain=self.purify,
            jpeg_quality=self.jpeg_quality,
            noise_std=self.noise_std,
            resize_factor=self.resize_factor,
        )

    def recipe(self) -> FinetuneConfig:
        return FinetuneConfig(steps=self.steps, checkpoint_every=0, preview_n=0)


@dataclass
class Variant:
    """One kind of photo set (at one budget) for every victim, with its visible cost."""

    kind: str
    budget: float | None
    photos: list  # per victim: the crops the LoRA is trained on
    psnr: list = field(default_factory=list)  # per victim: mean PSNR of its photos against the originals
    ssim: list = field(default_factory=list)
    loss_gain: list = field(default_factory=list)  # per victim (cloaked kinds): surrogate loss cloaked / clean


# photos ---------------------------------------------------------------------------------------------


def cloaked_set(pipe, photos, cfg: CloakConfig):
    """Step of a job: {"photos", "loss_gain", "seconds"} of one victim's cloak, cached per (base, photos,
    cloak settings); a Message when it was computed."""
    from safetensors.numpy import load_file, save_file

    from core.model.prior import base_fingerprint, cache_dir

    path = (
        cache_dir()
        / "cloaked"
        / f"{digest(base_fingerprint(pipe), asdict(cfg), [np.asarray(p) for p in photos])}.safetensors"
    )
    if path.exists():
        d = load_file(str(path))
        return dict(photos=list(d["photos"]), loss_gain=float(d["loss_gain"][0]), seconds=float(d["seconds"][0]))
    res = drain(cloak_photos(pipe, photos, cfg))
    out = dict(photos=res.cloaked, loss_gain=res.loss_cloaked / res.loss_clean, seconds=res.seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "photos": np.stack(res.cloaked),
            "loss_gain": np.array([out["loss_gain"]]),
            "seconds": np.array([res.seconds]),
        },
        str(path),
    )
    yield Message(
        f"  cloaked {len(photos)} photos at {cfg.budget:g}/255 in {res.seconds:.1f} s (surrogate loss "
        f"x{out['loss_gain']:.2f})"
    )
    return out


def visible_cost(variant: Variant, originals) -> Variant:
    variant.psnr = [float(np.mean([psnr(p, o) for p, o in zip(ps, os_)])) for ps, os_ in zip(variant.photos, originals)]
    variant.ssim = [float(np.mean([ssim(p, o) for p, o in zip(ps, os_)])) for ps, os_ in zip(variant.photos, originals)]
    return variant


def build_variants(pipe, private, cfg: CloakingStudyConfig, should_stop=never):
    """Step of a job: every photo set of the study (the clean one first), cloaks cached; a Progress per
    victim's cloak. Returns the list of :class:`Variant`, or None when stopped."""
    pcfg = cfg.purify_config()
    out = [
        Variant(CLEAN, None, private),
        visible_cost(Variant(PURIFIED, None, [purify(p, pcfg) for p in private]), private),
    ]
    t0, total = time.perf_counter(), len(cfg.budgets) * len(private)
    for k, b in enumerate(cfg.budgets):
        yield Message(f"cloaking at budget {b:g}/255:")
        sets = []
        for p in private:
            if should_stop():
                return None
            sets.append((yield from cloaked_set(pipe, p, cfg.cloak_config(b))))
            yield Progress("cloaked photo sets", k * len(private) + len(sets), total, time.perf_counter() - t0)
        gains = [s["loss_gain"] for s in sets]
        out.append(visible_cost(Variant(CLOAKED, b, [s["photos"] for s in sets], loss_gain=gains), private))
        out.append(visible_cost(Variant(BOTH, b, [purify(s["photos"], pcfg) for s in sets], loss_gain=gains), private))
    return out


# LoRAs ----------------------------------------------------------------------------------------------


def variant_loras(pipe, names, photo_sets, seeds, cfg: FinetuneConfig, group: int = 16, should_stop=never):
    """Step of a job: {"lora", "trigger"} per (victim, photo set), trained K at a time (a Progress per
    group), cached per (base, victim, photos, recipe, seed). Returns the list, or None when stopped."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from core.attack.shadow import train_many
    from core.model.prior import base_fingerprint, cache_dir

    root = cache_dir() / "cloak_loras" / base_fingerprint(pipe)
    recipe = asdict(cfg) | {"unet_targets": list(cfg.unet_targets)}
    files = [
        root / f"{digest(n, recipe, int(s), [np.asarray(p) for p in ps])}.safetensors"
        for n, ps, s in zip(names, photo_sets, seeds)
    ]
    todo = [i for i, f in enumerate(files) if not f.exists()]
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    for s in range(0, len(todo), group):
        if should_stop():
            return None
        g = todo[s : s + group]
        t0 = time.perf_counter()
        res = drain(train_many(pipe, [photo_sets[i] for i in g], cfg, seeds=[int(seeds[i]) for i in g]))
        for k, i in enumerate(g):
            save_file(
                {n: v.contiguous() for n, v in res["trajectory"][cfg.steps][k].items()},
                str(files[i]),
                metadata={"identity": names[i], "trigger": res["triggers"][k], "seed": str(seeds[i])},
            )
        yield Message(f"  LoRAs {s + 1}..{s + len(g)} of {len(todo)}: {time.perf_counter() - t0:.0f} s")
        yield Progress("protected LoRAs", s + len(g), len(todo), time.perf_counter() - t_start)
    out = []
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.append({"lora": {k: h.get_tensor(k).float() for k in h.keys()}, "trigger": h.metadata()["trigger"]})
    return out


# scoring --------------------------------------------------------------------------------------------


@dataclass
class Victims:
    names: list
    private: list  # per victim: its 5 private crops
    seeds: list  # per victim: the seed of each of its LoRAs
    clean: list  # per victim: {"lora", "trigger"} of its clean LoRA (the attack and defenses studies' cache)


def load_victims(pipe, n: int, cfg: CloakingStudyConfig, root=None, should_stop=never):
    """Step of a job: the first ``n`` victims, their private photos and clean LoRAs (the attack and
    defenses studies' cache); returns :class:`Victims`, or None when stopped."""
    from core.model.pipeline import image_size_of
    from core.studies.attack import VICTIM_SEED0, identities, train_victim_loras

    names, people = identities("victims", n, root)
    private = [list(aligned.load_crops(people[v][:PHOTOS], size=image_size_of(pipe))) for v in names]
    loras = yield from train_victim_loras(pipe, names, private, cfg.recipe(), should_stop=should_stop)
    if loras is None:
        return None
    return Victims(
        names,
        private,
        [VICTIM_SEED0 + i for i in range(len(names))],
        [{"lora": lo["checkpoints"][cfg.steps], "trigger": lo["trigger"]} for lo in loras],
    )


def _interval(values) -> dict:
    v = np.asarray(values, np.float64)
    lo, hi = metrics.bootstrap_ci(v)
    return dict(mean=float(v.mean()), ci=[lo, hi])


def make_row(
    variant: Variant, utility_d, attack_desc, gallery, floor_d, clean: dict | None, seconds: float = 0.0
) -> dict:
    """One row: the LoRA's utility and the attack over the victims, each against the floor and (paired
    per victim) against the clean row, with the visible cost of the photos."""
    from core.studies.attack import summarize

    ud = np.asarray(utility_d, np.float64)
    row = dict(
        kind=variant.kind,
        budget=variant.budget,
        label=label_of(variant.kind, variant.budget),
        utility=dict(
            distance=float(ud.mean()),
            distance_ci=list(metrics.bootstrap_ci(ud)),
            beats_floor=float((ud < floor_d).mean()),
            per_victim_distance=[round(float(x), 4) for x in ud],
        ),
        utility_gain=_interval(floor_d - ud),
        attack=None,
        attack_gain=None,
        seconds=round(float(seconds), 1),
    )
    row["utility_at_floor"] = bool(row["utility_gain"]["ci"][0] <= 0)
    if attack_desc is not None:
        row["attack"] = summarize(np.asarray(attack_desc, np.float64), gallery)
        row["attack_gain"] = _interval(floor_d - metrics.distance(attack_desc, gallery))
        row["attack_at_floor"] = bool(row["attack_gain"]["ci"][0] <= 0)
    if clean is not None:  # what the photos changed, per victim: distance of this row minus the clean row's
        row["utility_vs_clean"] = _interval(ud - np.asarray(clean["utility"]["per_victim_distance"]))
        if attack_desc is not None and clean.get("attack"):
            row["attack_vs_clean"] = _interval(
                np.asarray(row["attack"]["per_victim_distance"]) - np.asarray(clean["attack"]["per_victim_distance"])
            )
    for key in ("psnr", "ssim", "loss_gain"):
        vals = getattr(variant, key)
        row[key] = _interval(vals) if len(vals) else None
    return row


def label_of(kind: str, budget) -> str:
    return KIND_TITLES[kind] + (f", budget {budget:g}/255" if budget is not None else "")


def score_variant(
    pipe, attacker, victims: Victims, variant: Variant, loras: list, cfg: CloakingStudyConfig, floor_ims
) -> dict:
    """{"utility_distance", "attack_desc" (or None), "seconds"} of one variant's LoRAs, cached."""
    from core.attack.attacker import ATTACK_SAMPLER_STEPS, ATTACK_W
    from core.attack.report import reconstruct_lora
    from core.model.prior import base_fingerprint

    rec = cfg.recipe()

    def measure():
        t0 = time.perf_counter()
        util, descs = [], []
        for i, lo in enumerate(loras):
            util.append(
                lora_utility(
                    pipe, lo["lora"], lo["trigger"], victims.private[i], alpha=rec.alpha, floor=floor_ims
                ).distance
            )
            if attacker is not None:
                descs.append(describe_set(reconstruct_lora(pipe, attacker, lo["lora"], rec.steps, rec.alpha)).tolist())
        return {"utility_distance": util, "attack_desc": descs or None, "seconds": time.perf_counter() - t0}

    parts = [
        base_fingerprint(pipe),
        victims.names,
        asdict(rec) | {"unet_targets": list(rec.unet_targets)},
        ATTACK_W,
        ATTACK_SAMPLER_STEPS,
        attacker.state_dict() if attacker is not None else None,
        victims.private,
        [lo["lora"] for lo in loras],
        [lo["trigger"] for lo in loras],
    ]
    return cached("cloak_points", parts, measure)


@dataclass
class CloakingResult:
    """Every row of the study (:func:`make_row`: clean, purified, cloaked and cloaked + purified at each
    budget, floor) and what they were measured with: the report's JSON, less its header."""

    n: int
    chance_top1: float
    chance_top5: float
    victims: list
    rows: list
    attack_measured: bool
    cloak: dict  # the cloak's settings, but its budget
    purify: dict  # the purification's settings
    purify_words: str
    budgets: list
    recipe_steps: int


def protected_loras(pipe, victims: Victims, variants: list, cfg: CloakingStudyConfig, should_stop=never):
    """Step of a job: {id(variant): per victim {"lora", "trigger"}} of every variant but the clean one
    (:func:`variant_loras`, cached); None when stopped."""
    n = len(victims.names)
    others = [v for v in variants if v.kind != CLEAN]
    yield Message(f"fine-tuning {n * len(others)} LoRAs on protected or purified photos (cached ones are reused):")
    flat = yield from variant_loras(
        pipe,
        [nm for _ in others for nm in victims.names],
        [p for v in others for p in v.photos],
        [s for _ in others for s in victims.seeds],
        cfg.recipe(),
        should_stop=should_stop,
    )
    if flat is None:
        return None
    return {id(v): flat[k * n : (k + 1) * n] for k, v in enumerate(others)}


def row_text(row: dict) -> str:
    att = f"   attack {row['attack']['distance']:.3f} (top-1 {row['attack']['top1']:.0%})" if row["attack"] else ""
    return (
        f"{row['label']:<42} LoRA {row['utility']['distance']:.3f} (gain over floor "
        f"{row['utility_gain']['mean']:+.3f}){att}"
    )


def study_result(victims: Victims, rows: list, attack_measured: bool, cfg: CloakingStudyConfig) -> CloakingResult:
    n = len(victims.names)
    cloak = asdict(cfg.cloak_config(cfg.budgets[0]))
    cloak.pop("budget")
    return CloakingResult(
        n=n,
        chance_top1=1 / n,
        chance_top5=min(1.0, 5 / n),
        victims=victims.names,
        rows=rows,
        attack_measured=attack_measured,
        cloak=cloak,
        purify=asdict(cfg.purify_config()),
        purify_words=cfg.purify_config().words(),
        budgets=list(cfg.budgets),
        recipe_steps=cfg.steps,
    )


def run_study(pipe, attacker, victims: Victims, cfg: CloakingStudyConfig, should_stop=never):
    """Job: every row of the study (clean, purified, cloaked and cloaked + purified at each budget, floor)
    on ``victims``, a Progress per row; Done(CloakingResult). On a stop: the rows measured so far and the
    floor, cancelled (Done(None, cancelled) when no row was measured)."""
    n = len(victims.names)
    gallery = np.stack([describe_set(p) for p in victims.private])
    floor_ims = floor_images(pipe)
    floor_desc = describe_set(floor_ims)
    floor_d = metrics.distance(floor_desc, gallery)
    variants = yield from build_variants(pipe, victims.private, cfg, should_stop)
    loras = None if variants is None else (yield from protected_loras(pipe, victims, variants, cfg, should_stop))
    if loras is None:
        yield Done(None, cancelled=True)
        return
    rows, clean, t0 = [], None, time.perf_counter()
    for v in variants:
        if should_stop():
            break
        hit = score_variant(
            pipe, attacker, victims, v, victims.clean if v.kind == CLEAN else loras[id(v)], cfg, floor_ims
        )
        row = make_row(v, hit["utility_distance"], hit["attack_desc"], gallery, floor_d, clean, hit["seconds"])
        clean = clean or row
        rows.append(row)
        yield Message(row_text(row))
        scores = {"LoRA": row["utility"]["distance"]} | ({"attack": row["attack"]["distance"]} if row["attack"] else {})
        yield Progress("cloaking rows", len(rows), len(variants), time.perf_counter() - t0, scores)
    if not rows:
        yield Done(None, cancelled=True)
        return
    floor_attack = np.repeat(floor_desc[None], n, 0) if attacker is not None else None
    rows.append(make_row(Variant(FLOOR, None, []), floor_d, floor_attack, gallery, floor_d, None))
    yield Done(study_result(victims, rows, attacker is not None, cfg), cancelled=len(rows) <= len(variants))


def run(pipe, attacker, cfg: CloakingStudyConfig, root=None, should_stop=never):
    """The study as a job: the first ``cfg.n`` victims and their clean LoRAs (:func:`load_victims`), then
    every row (:func:`run_study`); Done(CloakingResult)."""
    victims = yield from load_victims(pipe, cfg.n, cfg, root, should_stop)
    if victims is None:
        yield Done(None, cancelled=True)
        return
    yield from run_study(pipe, attacker, victims, cfg, should_stop)


# reporting ------------------------------------------------------------------------------------------


def _ci(x: dict, digits: int = 3, sign: bool = False) -> str:
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(x['mean'])} [{f.format(x['ci'][0])}, {f.format(x['ci'][1])}]"


def _measurable(x: dict | None) -> str:
    if not x:
        return "not measured"
    if x["ci"][0] > 0:
        return "measurably further from the person"
    if x["ci"][1] < 0:
        return "measurably closer to the person"
    return "not measurably different"


def table_markdown(r: dict) -> str:
    lines = [
        "| photos the LoRA trained on | PSNR (dB) | SSIM | cloak's surrogate loss, x clean | LoRA with trigger: "
        "distance [95 % CI] | vs clean (per victim) | LoRA beats floor | attack: distance [95 % CI] | top-1 | attack "
        "vs clean |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        u, a = x["utility"], x["attack"]
        cost = lambda k, d, x=x: _ci(x[k], d) if x.get(k) else ""
        lines.append(
            f"| {x['label']} | {cost('psnr', 1)} | {cost('ssim', 3)} | {cost('loss_gain', 2)} | "
            f"{u['distance']:.3f} [{u['distance_ci'][0]:.3f}, {u['distance_ci'][1]:.3f}] | "
            f"{_ci(x['utility_vs_clean'], sign=True) if x.get('utility_vs_clean') else ''} | {u['beats_floor']:.0%} | "
            + (
                f"{a['distance']:.3f} [{a['distance_ci'][0]:.3f}, {a['distance_ci'][1]:.3f}] | {a['top1']:.0%} | "
                f"{_ci(x['attack_vs_clean'], sign=True) if x.get('attack_vs_clean') else ''} |"
                if a
                else "not measured | | |"
            )
        )
    return "\n".join(lines)


PAPERS = (
    "Anti-DreamBooth (Van Le et al., ICCV 2023) reports that photos perturbed by ASPL within a budget of about 6/255 "
    "(300 PGD steps against Stable Diffusion) make DreamBooth's samples of the person lose their identity; "
    "Hönig et al. (2024, *Adversarial perturbations cannot reliably protect artists from generative AI*) report "
    "that simple purification (JPEG, noise, upscaling) before fine-tuning removes such protections."
)


def conclusion(r: dict) -> str:
    """Sentences read off the numbers, then set against the papers' claims."""
    rows = r["rows"]
    clean = next(x for x in rows if x["kind"] == CLEAN)
    flo = next(x for x in rows if x["kind"] == FLOOR)
    pur = next((x for x in rows if x["kind"] == PURIFIED), None)
    out = [
        f"On {r['n']} victims, the LoRA trained on the clean photos draws the person at distance "
        f"{clean['utility']['distance']:.3f} (a random face: {flo['utility']['distance']:.3f}; gain over the floor "
        f"{_ci(clean['utility_gain'], sign=True)})"
        + (
            f"; the attacker's reconstruction from it is at "
            f"{clean['attack']['distance']:.3f} (top-1 {clean['attack']['top1']:.0%})."
            if clean["attack"]
            else "; the attack was not measured."
        )
    ]
    if pur:
        out.append(
            f"Purification alone ({r['purify_words']}) moves the clean LoRA by "
            f"{_ci(pur['utility_vs_clean'], sign=True)} ({_measurable(pur['utility_vs_clean'])})."
        )
    cloaked = [x for x in rows if x["kind"] == CLOAKED]
    both = {x["budget"]: x for x in rows if x["kind"] == BOTH}
    for x in cloaked:
        y = both.get(x["budget"])
        out.append(
            f"Cloaked at {x['budget']:g}/255 (PSNR {x['psnr']['mean']:.1f} dB, SSIM {x['ssim']['mean']:.3f}): the "
            f"LoRA's samples move by {_ci(x['utility_vs_clean'], sign=True)} "
            f"({_measurable(x['utility_vs_clean'])}{', at the floor' if x['utility_at_floor'] else ''})"
            + (
                f", the attack by {_ci(x['attack_vs_clean'], sign=True)} ({_measurable(x['attack_vs_clean'])})"
                if x.get("attack_vs_clean")
                else ""
            )
            + (
                f"; after purification by {_ci(y['utility_vs_clean'], sign=True)} "
                f"({_measurable(y['utility_vs_clean'])})."
                if y
                else "."
            )
        )
    strongest = max(cloaked, key=lambda x: x["budget"]) if cloaked else None
    out.append("Against the papers: " + PAPERS)
    if strongest:
        out.append(paper_verdict(strongest, both.get(strongest["budget"])))
    out.append(
        f"Caveats: the cloak here is a cheaper variant ({r['cloak']['steps']} PGD steps, surrogate "
        f"{r['cloak']['surrogate']}) on the project's miniature model, far from ASPL's 300 steps on Stable Diffusion; "
        f"a null result means this cloak at this cost, not that no cloak can work. With {r['n']} victims, "
        '"not measurably" means the 95 % interval of the per-victim change covers 0.'
    )
    return " ".join(out)


def paper_verdict(x: dict, y: dict | None) -> str:
    """The strongest cloak (row ``x``) and its purified row ``y`` against the papers' two claims."""
    works = x["utility_vs_clean"]["ci"][0] > 0
    if not works:
        return (
            "Here even the largest budget does not measurably protect the person: the LoRA trained on cloaked photos "
            "draws them about as well as the clean one, short of Anti-DreamBooth's claim."
        )
    text = "Here the cloak does push the LoRA away from the person at its largest budget" + (
        ", down to the floor (the protection Anti-DreamBooth claims)"
        if x["utility_at_floor"]
        else ", but not to the floor: the LoRA still draws the person better than a random face"
    )
    if y is None:
        return text + "."
    shift, left = x["utility_vs_clean"]["mean"], y["utility_vs_clean"]["mean"]
    attack = ""
    if x.get("attack_vs_clean") and y.get("attack_vs_clean"):
        attack = (
            f"; the attack keeps {y['attack_vs_clean']['mean']:+.3f} of its {x['attack_vs_clean']['mean']:+.3f} shift"
        )
    if y["utility_vs_clean"]["ci"][0] <= 0:
        return text + f"; purification takes the protection away, as Hönig et al. found{attack}."
    amount = "most of it" if left < 0.5 * shift else "part of it" if left < 0.75 * shift else None
    if amount:
        return (
            text + f"; purification removes {amount} ({left:+.3f} of the {shift:+.3f} shift remains{attack}), in "
            "the direction of Hönig et al.'s finding."
        )
    return text + f"; purification does not take it away here{attack}, unlike Hönig et al.'s finding."


def to_markdown(r: dict) -> str:
    head = (
        f"Photo cloaking against a LoRA fine-tune, with and without purification, on {r['n']} victims (chance top-1 "
        f"{r['chance_top1']:.0%}); base {r.get('base', '?')}"
        + (f"; attacker `{r.get('attacker', '?')}`" if r["attack_measured"] else "; attack not measured")
        + f". Produced by `{r.get('command', 'python -m core.studies.cloaking')}` on {r.get('created', '?')}."
    )
    expl = (
        f"Cloak: {r['cloak']['steps']} PGD steps on the fine-tune's denoising loss within an L-infinity budget on the "
        f"0-255 image, surrogate {r['cloak']['surrogate']} (core.defenses.cloak). Purification: {r['purify_words']}. "
        f"Every LoRA: the default recipe ({r['recipe_steps']} steps) with the victim's own seed, on the photos named "
        "in the row; scored against the victim's *clean* photos. Distances: dlib descriptor distance of the mean face "
        "of 4 images to the private photos (lower = more alike). *LoRA with trigger*: its own samples with its true "
        "trigger (does it still draw the person?); *attack*: the weight-only attacker's reconstruction. *vs clean*: "
        "per victim, this row's distance minus the clean row's (positive = further from the person), mean and 95 % "
        "bootstrap interval. PSNR/SSIM: the photos trained on against the originals."
    )
    parts = [head, expl, table_markdown(r), "**Conclusion.** " + r.get("conclusion", conclusion(r))]
    if r["n"] < 20:
        parts.insert(
            1,
            f"*Smoke run: {r['n']} victims (the protocol's is 20, `--n 20`); intervals over so few victims are rough.*",
        )
    return "\n\n".join(parts) + "\n"


@dataclass
class Args(CloakingStudyConfig):
    out: str = str(RESULTS)  # folder of cloaking.json, cloaking.md, cloaking_chart.json
    attack: bool = True  # also measure the weight-only attack (needs an attacker trained for this base model)
    attacker: str = str(ASSETS / "attacker" / "attacker.safetensors")  # the attacker's file
    attacker_base_check: bool = True  # refuse an attacker of another base (False: smoke runs; the report says so)
    data: str | None = None  # LFW folder (default $LEAKLAB_LFW or ../shared/data/lfw-deepfunneled)
    model: str | None = None  # base model folder or hub id (default: the embedded one)


def load_checked_attacker(pipe, a: Args):
    """(the attacker or None, a note for the report); SystemExit with a sentence when it cannot be used."""
    from core.attack.attacker import load_attacker
    from core.model.prior import base_fingerprint

    if not a.attack:
        return None, "not measured (--attack False)"
    path = Path(a.attacker)
    if not path.is_file():
        raise SystemExit(
            f"No trained attacker at {path}: train one (`python -m core.attack.shadow`, then "
            "`python -m core.attack.train`), pass --attacker PATH, or run with --attack False."
        )
    attacker, _ = load_attacker(path, pipe.device)
    if attacker.cfg.base != base_fingerprint(pipe):
        if a.attacker_base_check:
            raise SystemExit(
                f"The attacker at {path} was trained for another base model ({attacker.cfg.base}; this one is "
                f"{base_fingerprint(pipe)}). Retrain it, or run with --attack False (or, for a smoke run, "
                "--attacker-base-check False)."
            )
        return (
            attacker,
            f"{shown(path)} (recorded for base {attacker.cfg.base}, run on {base_fingerprint(pipe)}: base check off)",
        )
    return attacker, shown(path)


def shown(path: Path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    from core import PROJECT_ROOT

    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def main(argv=None):
    import sys

    import torch

    from core.cli import command_line, config_of, parse
    from core.model.pipeline import load_pipeline
    from core.model.prior import base_fingerprint
    from core.plots import cloaking_plot

    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(Args, argv, description="Photo cloaking against a LoRA fine-tune, with and without purification")
    cfg = config_of(a, CloakingStudyConfig)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    pipe = load_pipeline(a.model)
    attacker, note = load_checked_attacker(pipe, a)
    res = run_with_progress_bar(run(pipe, attacker, cfg, a.data))
    if res is None:
        raise SystemExit("The study stopped before its first row was measured: nothing written.")
    r = dict(
        command=command_line("core.studies.cloaking", argv),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        base=base_fingerprint(pipe),
        attacker=note,
        seconds=round(time.perf_counter() - t0),
        **asdict(res),
    )
    r["conclusion"] = conclusion(r)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cloaking.json").write_text(json.dumps(r, indent=1, allow_nan=False) + "\n")
    (out / "cloaking.md").write_text(to_markdown(r))
    (out / "cloaking_chart.json").write_text(cloaking_plot(r).to_json() + "\n")
    print(to_markdown(r))


if __name__ == "__main__":
    main()
