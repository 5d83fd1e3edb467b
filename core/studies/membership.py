"""Was my photo used? Membership inference on shared LoRAs. ``python -m core.studies.membership``.

Protocol (docs/EVAL's victims; score of :mod:`core.attack.membership`):
- **calibration** on *tuning* people (shadow identities the shipped attacker never saw, never victims):
  each gets the default LoRA on its first 5 photos (cached as the attack study's tuning LoRAs); the
  threshold is the score that ``--fpr`` (5 %) of their *unseen* photos (same person, not in the LoRA's
  set) exceed. The study's defaults for the score (its timesteps) were chosen on tuning people too;
- **evaluation** on victims (never seen by the base model, the shadow population or the attacker):
  the first victims of the split, as many as needed for ``--n`` of them to have unseen photos (>= 6
  photos); each victim's default LoRA on its first 5 photos (the cached LoRAs of the attack and
  defenses studies, same seeds). Per LoRA three kinds of photo are scored: its **members** (the 5),
  **unseen** photos of the same person (up to ``--max-unseen``), and **other people's** photos (the
  first photo of the next ``--n-others`` victims);
- ROC AUC of members vs unseen (victims with unseen photos) and of members vs other people (all),
  pooled over LoRAs, each with a 95 % bootstrap interval over victims (resampling whole victims);
  the calibrated threshold's true-positive rate on members and false-positive rates on the victims'
  unseen and other people's photos (does the calibration carry over?); the same AUCs for the LoRAs'
  checkpoints at steps 25 and 50 (memorisation grows with training). LoRAs and scores are cached, so a
  rerun (or a run after a stop) computes only what is new.

Writes ``<out>/membership.json`` (with the ``calibration`` block the app's membership check reads),
``membership.md`` and ``membership_chart.json`` (:func:`core.plots.membership_roc_plot`).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from core import RESULTS
from core.attack.membership import (
    MembershipConfig,
    auc,
    calibrate,
    photo_losses,
    roc_curve,
    scores_from_losses,
)
from core.events import Done, Message, Progress, never, run_with_progress_bar
from core.faces import aligned, metrics

STEPS_REPORTED = (25, 50)  # earlier checkpoints of each LoRA, scored as well


@dataclass
class MembershipStudyConfig(MembershipConfig):
    n: int = 20  # victims with unseen photos (>= 6 photos); the first victims of the split up to that many
    n_calibration: int = 20  # calibration people with unseen photos (tuning identities, never seen by the attacker)
    fpr: float = 0.05  # false-positive rate of the calibrated threshold on unseen photos of the LoRA's own person
    max_unseen: int = 5  # unseen photos scored per person, at most
    n_others: int = 5  # other people's photos scored per LoRA (the first photo of each of the next people)
    steps: int = 80  # fine-tuning steps of every LoRA (the default recipe's)

    def __post_init__(self):
        super().__post_init__()
        if self.n < 2 or self.n_calibration < 2:
            raise ValueError(f"n and n_calibration must be >= 2, got {self.n!r}, {self.n_calibration!r}")
        if not 0 < self.fpr < 1:
            raise ValueError(f"fpr must be in (0, 1), got {self.fpr!r}")
        if self.max_unseen < 1 or self.n_others < 1 or self.steps < 1:
            raise ValueError(
                f"max_unseen, n_others and steps must be >= 1, got {self.max_unseen!r}, "
                f"{self.n_others!r}, {self.steps!r}"
            )

    def score_config(self) -> MembershipConfig:
        return MembershipConfig(**{k: getattr(self, k) for k in MembershipConfig.__dataclass_fields__})


@dataclass
class People:
    """One group's people: private (member) photos, unseen photos, and their LoRAs' trajectories."""

    names: list
    private: list  # per person: 5 crops (the LoRA's training set)
    unseen: list  # per person: 0..max_unseen crops of the same person, not in the set
    loras: list  # per person: {step: lora}
    triggers: list = field(default_factory=list)


def prefix_with_unseen(group: str, n: int, root=None) -> tuple[list[str], dict]:
    """The shortest prefix of ``group``'s identities (the order every study uses, so cached LoRAs are
    shared) holding ``n`` people with unseen photos (>= 6 photos)."""
    from core.studies.attack import identities

    names, people = identities(group, 10_000, root)
    have = np.cumsum([len(people[v]) >= 6 for v in names])
    if not len(have) or have[-1] < n:
        raise ValueError(
            f"the {group} group has only {int(have[-1]) if len(have) else 0} people with >= 6 photos; asked for {n}"
        )
    return names[: int(np.searchsorted(have, n)) + 1], people


def load_people(pipe, group: str, n: int, cfg: MembershipStudyConfig, root=None, should_stop=never):
    """Step of a job: ``group``'s first people (:func:`prefix_with_unseen`), their photos and their LoRAs
    (cached as the attack study's, under ``group``); returns :class:`People`, or None when stopped."""
    from core.finetune.lora import FinetuneConfig
    from core.model.pipeline import image_size_of
    from core.studies.attack import train_victim_loras

    names, paths = prefix_with_unseen(group, n, root)
    size = image_size_of(pipe)
    private = [list(aligned.load_crops(paths[v][:5], size=size)) for v in names]
    unseen = [list(aligned.load_crops(paths[v][5 : 5 + cfg.max_unseen], size=size)) for v in names]
    loras = yield from train_victim_loras(
        pipe,
        names,
        private,
        FinetuneConfig(steps=cfg.steps, checkpoint_every=0, preview_n=0),
        folder=group,
        should_stop=should_stop,
    )
    if loras is None:
        return None
    return People(names, private, unseen, [lo["checkpoints"] for lo in loras], [lo["trigger"] for lo in loras])


def score_people(
    pipe, people: People, cfg: MembershipStudyConfig, steps, stage: str = "scored LoRAs", should_stop=never
):
    """Step of a job: {step: {"members" | "unseen" | "others": per person, an array of scores}} for every
    LoRA checkpoint in ``steps`` (a Progress named ``stage`` per person); None when stopped. Cached per
    (base, score settings, LoRA, photos), so a rerun (or a run after a stop) scores only what is new. The
    base model's losses are computed once per photo, when first needed."""

    from core.cache import cached
    from core.finetune.lora import pipeline_with_lora
    from core.model.prior import base_fingerprint

    mc = cfg.score_config()
    k = len(people.names)

    @functools.cache
    def base(kind: str, i: int):  # the base model's losses of person i's members or unseen photos
        return photo_losses(pipe, pipe.unet, (people.private if kind == "members" else people.unseen)[i], mc)

    others_of = [[((i + j) % k, 0) for j in range(1, min(cfg.n_others, k - 1) + 1)] for i in range(k)]
    out = {s: {"members": [], "unseen": [], "others": []} for s in steps}
    t0 = time.perf_counter()
    for i in range(k):
        if should_stop():
            return None
        others = [people.private[a][b] for a, b in others_of[i]]
        sets = {"members": people.private[i], "unseen": people.unseen[i], "others": others}
        for s in steps:

            def compute(i=i, s=s, sets=sets):
                unet = pipeline_with_lora(pipe, people.loras[i][s]).unet
                bases = {
                    "members": base("members", i),
                    "unseen": base("unseen", i),
                    "others": np.stack([base("members", a)[b] for a, b in others_of[i]]),
                }
                return {
                    kind: (
                        scores_from_losses(bases[kind], photo_losses(pipe, unet, ph, mc)).tolist() if len(ph) else []
                    )
                    for kind, ph in sets.items()
                }

            hit = cached(
                "membership_scores",
                [
                    base_fingerprint(pipe),
                    asdict(mc),
                    people.loras[i][s],
                    [np.asarray(p) for ph in sets.values() for p in ph],
                ],
                compute,
            )
            for kind in sets:
                out[s][kind].append(np.asarray(hit[kind], np.float64))
        if (i + 1) % 5 == 0 or i + 1 == k:
            yield Message(f"  scored {i + 1}/{k} LoRAs ({time.perf_counter() - t0:.0f} s)")
        yield Progress(stage, i + 1, k, time.perf_counter() - t0)
    return out


def auc_with_ci(pos: list, neg: list) -> dict:
    """Pooled AUC over people, with a 95 % bootstrap interval resampling whole people."""
    keep = [i for i in range(len(pos)) if len(pos[i]) and len(neg[i])]
    pooled = lambda ii: auc(
        np.concatenate([pos[keep[int(i)]] for i in ii]), np.concatenate([neg[keep[int(i)]] for i in ii])
    )
    lo, hi = metrics.bootstrap_ci(np.arange(len(keep)), pooled)
    return dict(
        auc=pooled(range(len(keep))),
        ci=[lo, hi],
        people=len(keep),
        positives=int(sum(len(pos[i]) for i in keep)),
        negatives=int(sum(len(neg[i]) for i in keep)),
    )


def rate_with_ci(scores: list, threshold: float) -> dict:
    """Share of the photos scoring above ``threshold``, pooled, with a bootstrap interval over people."""
    keep = [s for s in scores if len(s)]
    pooled = lambda ii: float(np.mean(np.concatenate([keep[int(i)] for i in ii]) > threshold))
    lo, hi = metrics.bootstrap_ci(np.arange(len(keep)), pooled)
    return dict(rate=pooled(range(len(keep))), ci=[lo, hi], photos=int(sum(len(s) for s in keep)))


def summarize(scores: dict, threshold: float) -> dict:
    """One step's row: AUCs (members vs unseen, vs other people), rates at the threshold, ROC curves."""
    m, u, o = scores["members"], scores["unseen"], scores["others"]
    cat = lambda xs: np.concatenate([x for x in xs if len(x)])
    return dict(
        auc_unseen=auc_with_ci(m, u),
        auc_others=auc_with_ci(m, o),
        tpr=rate_with_ci(m, threshold),
        fpr_unseen=rate_with_ci(u, threshold),
        fpr_others=rate_with_ci(o, threshold),
        mean_score={k: float(cat(v).mean()) for k, v in scores.items()},
        roc_unseen=roc_curve(cat(m), cat(u)),
        roc_others=roc_curve(cat(m), cat(o)),
    )


@dataclass
class MembershipResult:
    """The calibration and the victims' rows (:func:`summarize` per checkpoint step): the report's JSON,
    less its header."""

    calibration: dict  # core.attack.membership.Calibration as a dict (the app's membership check reads it)
    calibration_people: list
    calibration_auc_unseen: dict
    victims: list
    n_victims: int
    n_with_unseen: int
    rows: dict  # str(step) -> summarize()
    steps: list
    per_victim_scores: dict  # "members" | "unseen" | "others" -> per victim, its scores at the final step
    base: str
    study_config: dict
    seconds: int


def calibration_of(pipe, cfg: MembershipStudyConfig, root=None, should_stop=never):
    """Step of a job: (the calibration people, their scores at the final step, the Calibration); None
    when stopped."""
    from core.model.prior import base_fingerprint

    yield Message("calibration people (tuning identities):")
    people = yield from load_people(pipe, "tuning", cfg.n_calibration, cfg, root, should_stop)
    scores = None
    if people is not None:
        scores = yield from score_people(pipe, people, cfg, [cfg.steps], "scoring calibration LoRAs", should_stop)
    if scores is None:
        return None
    scores = scores[cfg.steps]
    cat = lambda xs: np.concatenate([x for x in xs if len(x)])
    cal = calibrate(
        cat(scores["members"]),
        cat(scores["unseen"]),
        cat(scores["others"]),
        cfg.fpr,
        base_fingerprint(pipe),
        cfg.steps,
        len(people.names),
        cfg.score_config(),
    )
    yield Message(
        f"threshold {cal.threshold:+.4f} (members above it: {cal.tpr:.0%}; other people: {cal.fpr_other:.0%})"
    )
    return people, scores, cal


def run_study(pipe, cfg: MembershipStudyConfig, root=None, should_stop=never):
    """The study as a job: the calibration on tuning people, then every victim's LoRA scored at each
    checkpoint step; Done(MembershipResult). On a stop: Done(None, cancelled) (LoRAs and scores are
    cached, so a rerun continues where it stopped)."""
    from core.model.prior import base_fingerprint

    t0 = time.perf_counter()
    got = yield from calibration_of(pipe, cfg, root, should_stop)
    victims = scores = None
    if got is not None:
        cal_people, cal_scores, cal = got
        yield Message("victims:")
        victims = yield from load_people(pipe, "victims", cfg.n, cfg, root, should_stop)
    if victims is not None:
        steps = [s for s in STEPS_REPORTED if s < cfg.steps and s in victims.loras[0]] + [cfg.steps]
        scores = yield from score_people(pipe, victims, cfg, steps, "scoring victims' LoRAs", should_stop)
    if scores is None:
        yield Done(None, cancelled=True)
        return
    rows = {str(s): summarize(scores[s], cal.threshold) for s in steps}
    result = MembershipResult(
        calibration=asdict(cal),
        calibration_people=cal_people.names,
        calibration_auc_unseen=auc_with_ci(cal_scores["members"], cal_scores["unseen"]),
        victims=victims.names,
        n_victims=len(victims.names),
        n_with_unseen=int(sum(1 for u in victims.unseen if len(u))),
        rows=rows,
        steps=steps,
        per_victim_scores={k: [[round(float(x), 5) for x in a] for a in v] for k, v in scores[cfg.steps].items()},
        base=base_fingerprint(pipe),
        study_config=asdict(cfg),
        seconds=round(time.perf_counter() - t0),
    )
    yield Done(result)


# reporting ------------------------------------------------------------------------------------------


def _auc_text(a: dict) -> str:
    return f"{a['auc']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}]"


def _rate_text(r: dict) -> str:
    return f"{r['rate']:.0%} [{r['ci'][0]:.0%}, {r['ci'][1]:.0%}]"


def table_markdown(r: dict) -> str:
    lines = [
        "| LoRA after | AUC: members vs unseen photos of the same person | AUC: members vs other people | "
        "members above the threshold | unseen photos above it | other people above it |",
        "|---|---|---|---|---|---|",
    ]
    for s in r["steps"]:
        row = r["rows"][str(s)]
        lines.append(
            f"| {s} steps{' (the default)' if s == r['calibration']['steps'] else ''} | {_auc_text(row['auc_unseen'])} "
            f"| {_auc_text(row['auc_others'])} | {_rate_text(row['tpr'])} | {_rate_text(row['fpr_unseen'])} | "
            f"{_rate_text(row['fpr_others'])} |"
        )
    return "\n".join(lines)


def conclusion(r: dict) -> str:
    """Sentences read off the numbers."""
    c, row = r["calibration"], r["rows"][str(r["calibration"]["steps"])]
    au, ao = row["auc_unseen"], row["auc_others"]
    strength = lambda a: (
        "near perfect"
        if a["ci"][0] >= 0.95
        else "strong"
        if a["ci"][0] >= 0.8
        else "measurable"
        if a["ci"][0] > 0.5
        else "not measurably better than a coin"
    )
    out = [
        f"On {r['n_victims']} victims, the LoRA-vs-base loss gap tells a LoRA's training photos from unseen photos of "
        f"the same person with AUC {_auc_text(au)} ({strength(au)}; {au['people']} victims with unseen photos) and "
        f"from other people's photos with AUC {_auc_text(ao)} ({strength(ao)})."
    ]
    out.append(
        f"At the threshold calibrated on {c['n_loras']} other people's LoRAs ({c['fpr_target']:.0%} of their unseen "
        f"photos above it), {_rate_text(row['tpr'])} of the victims' training photos score above it, against "
        f"{_rate_text(row['fpr_unseen'])} of their unseen photos and {_rate_text(row['fpr_others'])} of other people's."
    )
    drift = row["fpr_unseen"]["ci"][0] > c["fpr_target"] or row["fpr_unseen"]["ci"][1] < c["fpr_target"]
    out.append(
        "The calibrated false-positive rate does not carry over exactly to the victims (its interval misses the "
        "target)."
        if drift
        else "The calibrated false-positive rate carries over to the victims (its interval covers the target)."
    )
    early = [s for s in r["steps"] if s != c["steps"]]
    if early:
        out.append(
            "Earlier checkpoints: "
            + ", ".join(f"after {s} steps AUC {r['rows'][str(s)]['auc_unseen']['auc']:.3f}" for s in early)
            + " (members vs unseen)."
        )
    out.append(
        "The score needs the LoRA file and the public base model only (no trigger word, no other photos). The "
        f"threshold is calibrated for the app's default recipe ({c['steps']} steps); a LoRA trained longer fits its "
        "photos more closely (scores rise), a shorter one less."
    )
    return " ".join(out)


def to_markdown(r: dict) -> str:
    c = r["calibration"]
    head = (
        f"Membership inference on {r['n_victims']} victims ({r['n_with_unseen']} with unseen photos); base "
        f"{r['base']}. Produced by `{r.get('command', 'python -m core.studies.membership')}` on "
        f"{r.get('created', '?')}."
    )
    expl = (
        f"Score of a photo for a LoRA: mean over {len(c['config']['timesteps']) * c['config']['noises']} fixed "
        "(timestep, noise) draws (timesteps "
        f"{', '.join(map(str, c['config']['timesteps']))}"
        f"{', photo and mirror image' if c['config']['mirror'] else ''}) "
        "of log(base model's denoising error) - log(LoRA model's), class prompt. *Members*: the 5 photos the LoRA was "
        f"trained on; *unseen*: up to {r['study_config']['max_unseen']} other photos of the same person; *other "
        f"people*: the first photo of {r['study_config']['n_others']} other victims. AUC pooled over LoRAs, 95 % "
        f"bootstrap interval over victims. Threshold {c['threshold']:+.4f}: calibrated on {c['n_loras']} tuning "
        f"people's LoRAs (never victims) at {c['fpr_target']:.0%} false positives on their unseen photos (there: "
        f"members above it {c['tpr']:.0%}, other people {c['fpr_other']:.0%}; AUC members vs unseen "
        f"{_auc_text(r['calibration_auc_unseen'])})."
    )
    parts = [head, expl, table_markdown(r), "**Conclusion.** " + r.get("conclusion", conclusion(r))]
    if r["n_with_unseen"] < 20:
        parts.insert(
            1,
            f"*Smoke run: {r['n_with_unseen']} victims with unseen photos (the protocol's is 20, `--n 20`); "
            "intervals over so few victims are rough.*",
        )
    return "\n\n".join(parts) + "\n"


@dataclass
class Args(MembershipStudyConfig):
    out: str = str(RESULTS)  # folder of membership.json, membership.md, membership_chart.json
    data: str | None = None  # LFW folder (default $LEAKLAB_LFW or ../shared/data/lfw-deepfunneled)
    model: str | None = None  # base model folder or hub id (default: the embedded one)


def main(argv=None):
    import sys

    from core.cli import command_line, config_of, parse
    from core.model.pipeline import load_pipeline
    from core.plots import membership_roc_plot

    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(Args, argv, description="Membership inference on shared LoRAs: calibrate, then ROC AUC on victims")
    cfg = config_of(a, MembershipStudyConfig)
    pipe = load_pipeline(a.model)
    res = run_with_progress_bar(run_study(pipe, cfg, a.data))
    if res is None:
        raise SystemExit("The study stopped before it was complete: nothing written (a rerun reuses its cache).")
    r = dict(
        command=command_line("core.studies.membership", argv),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        **asdict(res),
    )
    r["conclusion"] = conclusion(r)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "membership.json").write_text(json.dumps(r, indent=1, allow_nan=False) + "\n")
    (out / "membership.md").write_text(to_markdown(r))
    (out / "membership_chart.json").write_text(membership_roc_plot(r).to_json() + "\n")
    print(to_markdown(r))


if __name__ == "__main__":
    main()
