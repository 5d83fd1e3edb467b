"""Does the default LoRA recipe carry the person? ``python -m core.studies.finetune``.

For each of the first ``--n`` victim identities (never seen by the base model; the recipe was tuned
on the *last* victims, see ``bench/finetune_recipe.py``): a fresh LoRA on its first 5
photos (docs/EVAL "private photos") with the recipe under test; 4 samples with the true trigger
(seeds 0..3) against 4 base-model class-prompt samples (the floor). Reports per victim and overall:
distances to the private gallery entry, the fraction of victims whose trigger samples beat the
floor, the fraction within 0.6, identification top-1 among the evaluated victims, and the
fine-tune time. Writes ``<out>/eval_finetune.json`` and ``.md``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from core import RESULTS
from core.events import Done, Message, Progress, drain, never, run_with_progress_bar
from core.faces import aligned, data, metrics
from core.faces.utility import describe_set, floor_images, lora_utility
from core.finetune.lora import FinetuneConfig, finetune
from core.model.pipeline import image_size_of, load_pipeline


@dataclass
class FinetuneStudyConfig:
    n: int = 20  # victims (the first N of the split; the recipe was tuned on the last ones)
    steps: int | None = None  # fine-tuning steps (None: the default recipe's)
    lr: float | None = None  # learning rate (None: the default recipe's)
    rank: int | None = None  # LoRA rank, with alpha = rank (None: the default recipe's)

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n!r}")
        self.recipe()  # the recipe's own checks of steps, lr and rank

    def recipe(self) -> FinetuneConfig:
        """The recipe under test: the default one with the values given here."""
        over = {k: getattr(self, k) for k in ("steps", "lr", "rank") if getattr(self, k) is not None}
        if self.rank is not None:
            over["alpha"] = float(self.rank)
        return replace(FinetuneConfig(checkpoint_every=0, preview_n=0), **over)


@dataclass
class FinetuneStudyResult:
    config: dict  # the recipe (FinetuneConfig as a dict)
    summary: dict
    victims: list  # per victim: name, distance, floor, beats_floor, same_person, seconds


def summarize(rows: list[dict], gen_desc: list, gallery: list) -> dict:
    """Distances, shares and identification over the victims of ``rows`` (ranks among them)."""
    rk = metrics.ranks(np.stack(gen_desc), np.stack(gallery), np.arange(len(rows)))
    d = np.array([r["distance"] for r in rows])
    f = np.array([r["floor"] for r in rows])
    beats = d < f
    return dict(
        n=len(rows),
        mean_distance_trigger=float(d.mean()),
        ci_trigger=metrics.bootstrap_ci(d),
        mean_distance_floor=float(f.mean()),
        ci_floor=metrics.bootstrap_ci(f),
        fraction_beats_floor=float(beats.mean()),
        fraction_within_0_6=float((d < metrics.SAME_PERSON).mean()),
        top1=float((rk == 1).mean()),
        top5=float((rk <= 5).mean()),
        mean_seconds=float(np.mean([r["seconds"] for r in rows])),
    )


def run(n: int = 20, cfg: FinetuneConfig | None = None, model=None, root=None, offset: int = 0, should_stop=never):
    """The study as a job: a fresh LoRA of recipe ``cfg`` per victim (victims ``offset`` .. ``offset + n``,
    seed ``cfg.seed + i``), scored against its private photos; a Progress per victim, then
    Done(FinetuneStudyResult) (on a stop: the victims measured so far, cancelled)."""
    cfg = cfg or FinetuneConfig(checkpoint_every=0, preview_n=0)
    pipe = load_pipeline(model)
    split = data.Split.load()
    people = split.paths("victims", root)
    names = split.victims[offset : offset + n]
    floor = floor_images(pipe)
    rows, gen_desc, gallery, t_start = [], [], [], time.perf_counter()
    for i, name in enumerate(names):
        if should_stop():
            break
        private = list(aligned.load_crops(people[name][:5], size=image_size_of(pipe)))
        t0 = time.perf_counter()
        res = drain(finetune(pipe, private, FinetuneConfig(**{**asdict(cfg), "seed": cfg.seed + i})))
        secs = time.perf_counter() - t0
        u = lora_utility(pipe, res.lora, res.trigger, private, alpha=cfg.alpha, floor=floor)
        gen_desc.append(describe_set(u.images))
        gallery.append(describe_set(private))
        rows.append(
            dict(
                name=name,
                distance=u.distance,
                floor=u.floor,
                beats_floor=u.beats_floor,
                same_person=u.same_person,
                seconds=round(secs, 1),
            )
        )
        yield Message(
            f"{i + 1:>3}/{len(names)} {name:<28} trigger {u.distance:.3f}  floor {u.floor:.3f}  {secs:5.1f} s"
        )
        yield Progress(
            "victims", i + 1, len(names), time.perf_counter() - t_start, {"trigger": u.distance, "floor": u.floor}
        )
    result = FinetuneStudyResult(asdict(cfg), summarize(rows, gen_desc, gallery), rows) if rows else None
    yield Done(result, cancelled=len(rows) < len(names))


def to_markdown(r: dict) -> str:
    s, c = r["summary"], r["config"]
    return (
        "\n".join(
            [
                f"# LoRA utility: default recipe on {s['n']} victims",
                "",
                f"Recipe: rank {c['rank']}, alpha {c['alpha']}, {c['steps']} steps, lr {c['lr']}, batch "
                f"{c['batch']}+{c['batch']} (photos + class images), {c['n_class']} cached class images, LoRA on UNet "
                f"{', '.join(c['unet_targets'])}{' + text encoder' if c['text_encoder'] else ''}.",
                "",
                "| images scored against the victim's 5 private photos | mean dlib distance [95 % CI] |",
                "|---|---|",
                (
                    f"| LoRA + true trigger (4 samples) | {s['mean_distance_trigger']:.3f} [{s['ci_trigger'][0]:.3f}, "
                    f"{s['ci_trigger'][1]:.3f}] |"
                ),
                (
                    f"| floor: base model + class prompt (4 samples) | {s['mean_distance_floor']:.3f} "
                    f"[{s['ci_floor'][0]:.3f}, {s['ci_floor'][1]:.3f}] |"
                ),
                "",
                f"- trigger samples closer than the floor: **{s['fraction_beats_floor']:.0%}** of victims",
                f"- within 0.6 (same person by dlib's rule): {s['fraction_within_0_6']:.0%}",
                (
                    f"- identification among these {s['n']} victims: top-1 {s['top1']:.0%}, top-5 {s['top5']:.0%} "
                    f"(chance {1 / s['n']:.0%}, {min(1, 5 / s['n']):.0%})"
                ),
                (
                    f"- mean fine-tune time {s['mean_seconds']:.1f} s per LoRA (wall time of this run; timings belong "
                    "to bench/finetune_speed.py)"
                ),
                "",
                f"Rebuild: `{r.get('command', 'python -m core.studies.finetune')}`.",
            ]
        )
        + "\n"
    )


@dataclass
class Args(FinetuneStudyConfig):
    """Does the default LoRA recipe carry the person?"""

    model: str | None = None  # base model folder or hub id (None: the embedded one)
    data: str | None = None  # LFW folder (None: $LEAKLAB_LFW or ../shared/data/lfw-deepfunneled)
    out: str = str(RESULTS)  # folder of the report
    name: str = "eval_finetune"  # file stem of the report


def main(argv=None):
    from core.cli import command_line, config_of, parse

    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(Args, argv, description=__doc__.split("\n")[0])
    cfg = config_of(a, FinetuneStudyConfig)
    r = asdict(run_with_progress_bar(run(cfg.n, cfg.recipe(), a.model, a.data)))
    r["command"] = command_line("core.studies.finetune", argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(r, indent=1) + "\n")
    md = to_markdown(r)
    (out / f"{a.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
