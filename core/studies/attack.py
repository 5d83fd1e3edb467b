"""How much does a shared LoRA give away? ``python -m core.studies.attack``.

Protocol (docs/EVAL), on the first ``--n`` victim identities (never seen by the base model, the
shadow population or the attacker):
- each victim gets a fresh LoRA from the default recipe on its 5 private photos (trained with
  :func:`core.attack.shadow.train_many`, which reproduces ``core.finetune.lora.finetune`` run by run; cached
  per base model, so reruns reuse them);
- every method under test makes 4 images (seeds 0..3) from the LoRA file's contents only
  (except the ceiling, which uses the true trigger, and the floor, which uses no LoRA);
- score: mean dlib descriptor of the 4 images -> distance to the victim's gallery entry (mean of
  the private photos), rank of the victim's entry among all N victims' (top-1 / top-5), within 0.6;
  means with 95 % bootstrap intervals over victims; "real" row = a held-out photo of the victim.

Writes ``<out>/attack.json`` and ``attack.md``; an image grid of the first victims goes to
``--grid`` (outside the repo by default: LFW photos are real people, never committed).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from core import RESULTS
from core.cli import Switch
from core.events import Done, Message, Progress, drain, never, run_with_progress_bar
from core.faces import aligned, data, metrics
from core.faces.utility import describe_set
from core.finetune.lora import FinetuneConfig, pipeline_with_lora
from core.model.prior import base_fingerprint, cache_dir

STEP_REPORT = (25, 50, 80)  # trajectory checkpoints kept per victim LoRA (80 = the default recipe's end)
VICTIM_SEED0 = 500_000  # victim i's LoRA is trained with seed VICTIM_SEED0 + i
ATTACKER_SHADOW_N = (
    128  # the shipped attacker's shadow population: the first 128 identities of the plan (attacker.json)
)


def train_victim_loras(
    pipe, names, private, cfg: FinetuneConfig, group: int = 16, folder: str = "victims", should_stop=never
):
    """Step of a job: per victim {"trigger", "checkpoints": {step: lora}}, trained ``group`` at a time
    (progress per group) once, cached per base model (under ``folder``: one per identity group); a cached
    file of another identity is retrained. Returns None when stopped."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from core.attack.shadow import read_trajectory, train_many, trajectory_tensors

    root = cache_dir() / folder / base_fingerprint(pipe)
    root.mkdir(parents=True, exist_ok=True)
    files = [root / f"{i:03d}.safetensors" for i in range(len(names))]

    def cached(i):
        if not files[i].exists():
            return False
        with safe_open(str(files[i]), "pt") as h:
            meta = h.metadata() or {}
        return meta.get("identity") == names[i] and meta.get("steps") == str(cfg.steps)

    todo = [i for i in range(len(names)) if not cached(i)]
    t_start = time.perf_counter()
    for s in range(0, len(todo), group):
        if should_stop():
            return None
        g = todo[s : s + group]
        t0 = time.perf_counter()
        res = drain(
            train_many(pipe, [private[i] for i in g], cfg, seeds=[VICTIM_SEED0 + i for i in g], record_every=25)
        )
        for k, i in enumerate(g):
            save_file(
                trajectory_tensors(res["trajectory"], k),
                str(files[i]),
                metadata={
                    "identity": names[i],
                    "trigger": res["triggers"][k],
                    "seed": str(VICTIM_SEED0 + i),
                    "steps": str(cfg.steps),
                },
            )
        yield Message(f"{folder} LoRAs {g[0]}..{g[-1]}: {time.perf_counter() - t0:.0f} s")
        yield Progress(f"{folder} LoRAs", s + len(g), len(todo), time.perf_counter() - t_start)
    out = []
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.append({"trigger": h.metadata()["trigger"], "checkpoints": read_trajectory(h)})
    return out


def victim_recipe() -> FinetuneConfig:
    """The default recipe every victim's LoRA is trained with."""
    return FinetuneConfig(checkpoint_every=0, preview_n=0)


def identities(group: str = "victims", n: int = 50, root=None) -> tuple[list[str], dict]:
    """(the first ``n`` identities of ``group`` with >= 5 photos, {identity: photo paths}).

    ``victims``: the victim split, in its order (never seen by the base model, the shadow population
    or the attacker): every reported number. ``tuning``: shadow identities the shipped attacker never
    saw (after the first :data:`ATTACKER_SHADOW_N` of the shadow plan's order): where the attack's
    settings are chosen, so that no victim is looked at before the evaluation."""
    from core.attack.shadow import shadow_order

    split = data.Split.load()
    if group == "victims":
        people, order = split.paths("victims", root), split.victims
    elif group == "tuning":
        people = split.paths("shadow", root)
        order = shadow_order(0, people)[ATTACKER_SHADOW_N:]
    else:
        raise ValueError(f"group must be 'victims' or 'tuning', got {group!r}")
    return [v for v in order if len(people.get(v, [])) >= 5][:n], people


def summarize(desc: np.ndarray, gallery: np.ndarray) -> dict:
    d = metrics.distance(desc, gallery)
    rk = metrics.ranks(desc, gallery, np.arange(len(gallery)))
    top1, top5, within = (rk == 1).astype(float), (rk <= 5).astype(float), (d < metrics.SAME_PERSON).astype(float)
    return dict(
        n=len(d),
        distance=float(d.mean()),
        distance_ci=metrics.bootstrap_ci(d),
        top1=float(top1.mean()),
        top1_ci=metrics.bootstrap_ci(top1),
        top5=float(top5.mean()),
        top5_ci=metrics.bootstrap_ci(top5),
        within_0_6=float(within.mean()),
        within_ci=metrics.bootstrap_ci(within),
        per_victim_distance=[round(float(x), 4) for x in d],
    )


BASELINE_SAMPLER_STEPS = 25  # sampler steps of the baselines (the attacker rows: the app's, or --attack-steps)


@dataclass
class AttackStudyConfig:
    n: int = 50  # identities of the group (the first N with >= 5 photos)
    group: Literal["victims", "tuning"] = "victims"  # victims: the reported evaluation; tuning: to choose settings on
    no_baselines: Switch = False  # attacker rows only (ablations)
    attack_steps: int | None = None  # sampler steps of the attacker rows (None: the app's)
    extrapolate: tuple[float, ...] = ()  # extra rows: the first attacker sampled at each of these extrapolation weights

    def __post_init__(self):
        self.extrapolate = tuple(float(w) for w in self.extrapolate)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n!r}")
        if self.group not in ("victims", "tuning"):
            raise ValueError(f"group must be 'victims' or 'tuning', got {self.group!r}")
        if self.attack_steps is not None and self.attack_steps < 1:
            raise ValueError(f"attack_steps must be >= 1 (or None: the app's), got {self.attack_steps!r}")


@dataclass
class AttackResult:
    """Every method's rows over the identities measured (the JSON of the report, but ``grid``)."""

    n: int
    chance_top1: float
    chance_top5: float
    rows: dict  # method -> summarize() against the private photos
    rows_unseen: dict  # method -> summarize() against the victims' unseen photos ({} with < 5 such victims)
    n_unseen: int
    attack_seconds_mean: float
    recipe: dict
    attackers: dict  # label -> file
    base: str
    group: str
    attack_sampling: dict
    grid: list = field(default_factory=list, repr=False)  # image rows of the first victims (real people: never in JSON)

    def report(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "grid"}


def victim_images(pipe, models: dict, lo: dict, steps: int, cfg: AttackStudyConfig, t_attack: list) -> dict:
    """Method -> the 4 images it makes of one victim from the LoRA ``lo`` (its trigger and checkpoints).
    Each attacker's row is the attack as the app runs it (:func:`core.attack.attacker.reconstruct`'s
    defaults: z, then sampling extrapolated with w = ``ATTACK_W``); for the first attacker also its
    checkpoints at steps 25 and 50, its z alone (w = 1, the paper's attack) and one row per w in
    ``cfg.extrapolate``. Appends each attacker's wall time to ``t_attack``."""
    from core.attack import baselines
    from core.attack.attacker import ATTACK_SAMPLER_STEPS, ATTACK_W, reconstruct
    from core.model.prompts import CLASS_PROMPT

    a_steps = cfg.attack_steps or ATTACK_SAMPLER_STEPS
    first = next(iter(models))
    final = lo["checkpoints"][steps]
    view = pipeline_with_lora(pipe, final)

    def attack(att, lora, step, view=None, w=ATTACK_W):
        return reconstruct(pipe, att, lora, step, model=view, w=w, steps=a_steps)[0]

    ims = {}
    for label, att in models.items():
        t0 = time.perf_counter()
        ims[label] = attack(att, final, steps, view)
        t_attack.append(time.perf_counter() - t0)
        for st in STEP_REPORT[:-1]:
            if label == first and st in lo["checkpoints"]:
                ims[f"{label} @ step {st}"] = attack(att, lo["checkpoints"][st], st)
    ims[f"{first}: prompt only (w=1)"] = attack(models[first], final, steps, view, w=1.0)
    for w in cfg.extrapolate:
        ims[f"{first}, w={w:g}"] = attack(models[first], final, steps, view, w=w)
    if not cfg.no_baselines:
        b = BASELINE_SAMPLER_STEPS
        ims["naive (class prompt)"] = baselines.naive(pipe, final, CLASS_PROMPT, steps=b, model=view)
        ims["naive (empty prompt)"] = baselines.naive(pipe, final, "", steps=b, model=view)
        ims["FineXtract-style (w=3)"] = baselines.finextract(pipe, final, steps=b, model=view)
        ims["ceiling (true trigger)"] = baselines.ceiling(pipe, final, lo["trigger"], steps=b, model=view)
    return ims


def summarize_rows(rows: dict, names: list, people: dict, gallery: np.ndarray) -> tuple[dict, dict, int]:
    """(rows against the private photos with the "real (held-out photo)" reference, rows against the
    victims' unseen photos, how many victims have those) of the victims measured, ``names``."""
    # the "real" reference row: a held-out photo (victims with a 6th photo)
    real_idx = [i for i, v in enumerate(names) if len(people[v]) >= 6]
    real = {}
    if real_idx:
        probes = np.stack([describe_set(aligned.load_crops(people[names[i]][5:6])) for i in real_idx])
        real = summarize(probes, gallery[real_idx]) | {
            "note": f"a held-out photo, {len(real_idx)} victims with >= 6 photos"
        }
    results = {k: summarize(np.stack(v), gallery) for k, v in rows.items()}
    if real:
        results["real (held-out photo)"] = real
    # identity, not memorised pixels: the same scores against the victims' unseen photos (>= 2 of them)
    unseen_idx = [i for i, v in enumerate(names) if len(people[v]) >= 7]
    unseen = {}
    if len(unseen_idx) >= 5:
        ug = np.stack([describe_set(aligned.load_crops(people[names[i]][5:])) for i in unseen_idx])
        unseen = {k: summarize(np.stack(v)[unseen_idx], ug) for k, v in rows.items()}
    return results, unseen, len(unseen_idx)


def crops_of(names, people, size: int) -> list:
    """Each identity's 5 private photos, aligned at ``size`` px (the model's resolution)."""
    return [list(aligned.load_crops(people[v][:5], size=size)) for v in names]


def run(cfg: AttackStudyConfig, attackers: dict | None = None, model=None, root=None, should_stop=never):
    """The study as a job (docs/EVAL, see the module docstring): the LoRAs of ``cfg.n`` identities of
    ``cfg.group`` (cached), then every method on each, a Progress per victim; Done(AttackResult). On a
    stop: Done(the victims measured so far, cancelled). ``attackers``: label -> file (default: the shipped one)."""
    from core.attack import baselines
    from core.attack.attacker import ATTACK_SAMPLER_STEPS, ATTACK_W, load_attacker
    from core.model.pipeline import image_size_of, load_pipeline

    # 1. the base model, the identities and their LoRAs
    pipe = load_pipeline(model)
    names, people = identities(cfg.group, cfg.n, root)
    private = crops_of(names, people, image_size_of(pipe))
    recipe = victim_recipe()
    loras = yield from train_victim_loras(pipe, names, private, recipe, folder=cfg.group, should_stop=should_stop)
    if loras is None:
        yield Done(None, cancelled=True)
        return
    # 2. the attackers, the gallery and the floor
    attackers = attackers or {"attacker": None}
    models = {k: load_attacker(p)[0] for k, p in attackers.items()}
    gallery = np.stack([describe_set(p) for p in private])
    floor_desc = describe_set(baselines.floor(pipe, steps=BASELINE_SAMPLER_STEPS))
    # 3. every method on each victim
    rows: dict[str, list] = {}
    grid_rows, t_attack, t0 = [], [], time.perf_counter()
    for i, (name, lo) in enumerate(zip(names, loras)):
        if should_stop():
            break
        ims = victim_images(pipe, models, lo, recipe.steps, cfg, t_attack)
        for label, im in ims.items():
            rows.setdefault(label, []).append(describe_set(im))
        rows.setdefault("floor (base, class prompt)", []).append(floor_desc)
        if not cfg.no_baselines and len(grid_rows) < 8:
            grid_rows.append(
                [
                    *private[i][:2],
                    *ims[next(iter(models))][:2],
                    ims["naive (class prompt)"][0],
                    ims["FineXtract-style (w=3)"][0],
                    ims["ceiling (true trigger)"][0],
                ]
            )
        d = {k: float(metrics.distance(v[-1], gallery[i])) for k, v in rows.items()}
        words = "  ".join(f"{k.split(' ')[0]} {v:.3f}" for k, v in d.items())
        yield Message(f"{i + 1:>3}/{len(names)} {name:<26} {words}")
        yield Progress("attack", i + 1, len(names), time.perf_counter() - t0, {"attacker": d[next(iter(models))]})
    # 4. the rows over the victims measured
    done = len(next(iter(rows.values()), []))
    if not done:
        yield Done(None, cancelled=True)
        return
    results, unseen, n_unseen = summarize_rows(rows, names[:done], people, gallery[:done])
    yield Done(
        AttackResult(
            n=done,
            chance_top1=1 / done,
            chance_top5=min(1.0, 5 / done),
            rows=results,
            rows_unseen=unseen,
            n_unseen=n_unseen,
            attack_seconds_mean=float(np.mean(t_attack)),
            recipe=vars(recipe) | {"unet_targets": list(recipe.unet_targets)},
            attackers={k: str(v) for k, v in attackers.items()},
            base=base_fingerprint(pipe),
            group=cfg.group,
            attack_sampling=dict(w=ATTACK_W, sampler_steps=cfg.attack_steps or ATTACK_SAMPLER_STEPS),
            grid=grid_rows,
        ),
        cancelled=done < len(names),
    )


def prepare(cfg: AttackStudyConfig, model=None, root=None, should_stop=never):
    """Job: only train (and cache) the LoRAs of the study's identities; Done(how many)."""
    from core.model.pipeline import image_size_of, load_pipeline

    pipe = load_pipeline(model)
    names, people = identities(cfg.group, cfg.n, root)
    private = crops_of(names, people, image_size_of(pipe))
    loras = yield from train_victim_loras(
        pipe, names, private, victim_recipe(), folder=cfg.group, should_stop=should_stop
    )
    yield Done(None if loras is None else len(loras), cancelled=loras is None)


def load_report(path: str | Path | None = None) -> dict | None:
    """The last evaluation's results (``docs/results/attack.json``), or None where none was run."""
    from core import load_report as read

    return read("attack", path)


def attack_words(r: dict) -> str:
    a = r.get("attack_sampling")
    if not a:
        return ""
    return (
        f" The attacker rows are the attack as the app runs it: the encoder's prompt z, then {a['sampler_steps']} "
        f"sampler steps of the LoRA's model extrapolated w = {a['w']:g} away from the base model's prediction for "
        "the same z; \"prompt only (w=1)\" is the paper's attack (the LoRA's model alone with z)."
    )


def save_grid(rows, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = rows[0][0].shape[:2]
    canvas = Image.new("RGB", (w * len(rows[0]), h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            canvas.paste(Image.fromarray(np.asarray(im, np.uint8)), (c * w, r * h))
    canvas.save(path)


def to_markdown(r: dict) -> str:
    who = (
        "victims"
        if r.get("group", "victims") == "victims"
        else "tuning identities (shadow people the attacker never saw)"
    )
    lines = [
        f"Attack evaluation on {r['n']} {who} (chance: top-1 {r['chance_top1']:.0%}, top-5 {r['chance_top5']:.0%}); "
        f"base {r['base']}. The visitor path: every photo is the original LFW file aligned as a visitor's upload is "
        "(core.faces.ingest, 5-point alignment at the model's resolution). "
        "Distances are dlib descriptor distances to the victim's private photos "
        "(lower = more alike; same person < 0.6). 95 % bootstrap intervals over victims." + attack_words(r),
        "",
        "| method | mean distance | top-1 | top-5 | within 0.6 |",
        "|---|---|---|---|---|",
    ]
    for k, v in r["rows"].items():
        lines.append(
            f"| {k} | {v['distance']:.3f} [{v['distance_ci'][0]:.3f}, {v['distance_ci'][1]:.3f}] | "
            f"{v['top1']:.0%} [{v['top1_ci'][0]:.0%}, {v['top1_ci'][1]:.0%}] | {v['top5']:.0%} | "
            f"{v['within_0_6']:.0%} |"
        )
    if r.get("rows_unseen"):
        lines += [
            "",
            f"Against the victims' *unseen* photos (not in the LoRA's training set; {r['n_unseen']} victims with >= 2 "
            f"of them; ranks among those {r['n_unseen']}):",
            "",
            "| method | mean distance | top-1 | top-5 |",
            "|---|---|---|---|",
        ]
        for k, v in r["rows_unseen"].items():
            lines.append(f"| {k} | {v['distance']:.3f} | {v['top1']:.0%} | {v['top5']:.0%} |")
    lines += ["", f"Mean attack time per LoRA (encoder + 4 images, {r['attack_seconds_mean']:.2f} s on this machine)."]
    return "\n".join(lines) + "\n"


@dataclass
class Args(AttackStudyConfig):
    """Evaluate the weight-only attack and its baselines on victims."""

    attacker: tuple[str, ...] | None = None  # LABEL=PATH pairs (None: attacker=assets/attacker/attacker.safetensors)
    out: str = str(RESULTS)  # folder of the report
    name: str = "attack"  # file stem of the report
    grid: str | None = None  # image grid of the first victims (None: <cache dir>/attack_grid.png; keep out of the repo)
    data: str | None = None  # LFW folder (None: $LEAKLAB_LFW or ../shared/data/lfw-deepfunneled)
    model: str | None = None  # base model folder or hub id (None: the embedded one)
    prepare_only: Switch = False  # only train (and cache) the victims' LoRAs


def main(argv=None):
    from core.cli import command_line, config_of, parse

    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(Args, argv, description="Evaluate the weight-only attack and its baselines on victims")
    cfg = config_of(a, AttackStudyConfig)
    if a.prepare_only:
        run_with_progress_bar(prepare(cfg, a.model, a.data))
        return
    torch.manual_seed(0)
    atts = dict(x.split("=", 1) for x in a.attacker) if a.attacker else None
    r = run_with_progress_bar(run(cfg, atts, a.model, a.data))
    if r.grid:
        save_grid(r.grid, Path(a.grid) if a.grid else cache_dir() / "attack_grid.png")
    doc = r.report() | {"command": command_line("core.studies.attack", argv)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{a.name}.md").write_text(to_markdown(doc))
    print(to_markdown(doc))


if __name__ == "__main__":
    main()
