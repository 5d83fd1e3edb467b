"""Robustness study of the ownership watermarks: ``python -m core.studies.watermark``.

Protocol (issue 5, ``METHODS.md`` section 2):
1. the clean base, the AIAO-watermarked base (:mod:`core.watermark.aiao`) and the backdoor-watermarked base
   (:mod:`core.watermark.backdoor`), each with its key: by default the deltas the app ships
   (``assets/watermark``, :func:`core.watermark.shipped.shipped_watermark`), else given with ``--aiao`` /
   ``--backdoor`` (a delta file or a pipeline folder) and their keys, else embedded here;
2. each watermarked base is verified as it is, then after each downstream fine-tune *of that base*:
   (a) the default LoRA recipe (:mod:`core.finetune.lora`), (b) a ``--long-steps`` LoRA, (c) a
   ``--long-steps`` full fine-tune (:func:`core.finetune.full.full_finetune`), all three on the photos of a
   shadow identity (public faces) other than the one the owner's lazy-layer probe used, and (d)
   the default LoRA recipe on a subject of the DreamBooth items set (``../shared/data/dreambooth``:
   centre square crop at the model's resolution);
3. false positives: ``--n-clean`` un-watermarked models, fresh default-recipe LoRAs of the *clean*
   base on other shadow identities (one each, its own seed); a false positive is a "watermarked"
   verdict of either key on one of them;
4. quality cost: ``--quality-n`` class-prompt samples of each base (25 steps, guidance 1, as
   :mod:`core.studies.base`): face-detection rate and Frechet distance of dlib descriptors to as many
   real unseen faces (victim identities).
Writes ``<out>/watermark.json`` and ``watermark.md``, rewritten after every measurement (``"complete":
false`` until the end), so a run stopped early keeps what it measured. Every measurement is also
cached under a hash of what it depends on (weights, key, scenario, photos, settings): a rerun after
one watermark was re-embedded measures that watermark again and reuses the other's numbers. Order: before fine-tuning,
(a), (d), the false positives, quality, then the long runs (b) and (c).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from core import PROJECT_ROOT, RESULTS
from core.cache import cached, digest
from core.events import Done, Message, Progress, drain, never, run_with_progress_bar
from core.finetune.lora import FinetuneConfig, finetune, pipeline_with_lora

ITEMS_ROOT = PROJECT_ROOT.parent / "shared" / "data" / "dreambooth"
CLEAN_SEED0 = 700_000  # seed of clean model i's LoRA


SCENARIO_KEYS = ("before", "a", "b", "c", "d")  # the order of scenarios()


@dataclass
class StudyConfig:
    long_steps: int = 2000  # steps of the long LoRA and of the full fine-tune
    n_clean: int = 20  # un-watermarked models for the false-positive rate
    quality_n: int = 256  # samples per base for the quality measures (0: no quality measures)
    only: str = ""  # comma-separated scenarios to run, of before, a, b, c, d ("": all); e.g. "before,b" for a candidate
    photos: int = 5  # photos per fine-tune
    items_subject: str = "dog"  # DreamBooth items subject of fine-tune (d)
    seed: int = 0  # seed of the downstream fine-tunes (and of an AIAO watermark embedded by this run)

    def __post_init__(self):
        if self.long_steps < 1 or self.n_clean < 0 or 0 != self.quality_n < 2 or not 3 <= self.photos <= 10:
            raise ValueError(
                f"long_steps >= 1, n_clean >= 0, quality_n 0 or >= 2, photos 3..10; got {self.long_steps!r}, "
                f"{self.n_clean!r}, {self.quality_n!r}, {self.photos!r}"
            )
        bad = set(self.chosen()) - set(SCENARIO_KEYS)
        if bad:
            raise ValueError(f"only: unknown scenario(s) {sorted(bad)}; choose from {', '.join(SCENARIO_KEYS)}")

    def chosen(self) -> list[str]:
        """The scenario keys to run (all when ``only`` is empty)."""
        return [k.strip() for k in self.only.split(",") if k.strip()] or list(SCENARIO_KEYS)


@dataclass
class Watermarked:
    """One watermark under study: its name, its watermarked pipeline and a verify(pipe) -> result;
    ``key``: the owner's key object (part of what the study's cache is keyed by)."""

    name: str
    pipe: object
    verify: object  # callable: pipeline view -> Verification / BackdoorVerification
    key: object = None


# the study's cache: every measurement is stored under a hash of everything it depends on (the
# weights, the key, the scenario, the photos, the settings), so a rerun after one watermark was
# re-embedded, or after a stop, measures only what changed


def weights_digest(pipe) -> str:
    """A hash of every UNet and text-encoder weight of ``pipe`` (a watermark changes some of them)."""
    h = hashlib.sha256()
    for mod in (pipe.unet, pipe.text_encoder):
        for name, t in sorted(mod.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def key_digest(key) -> str:
    return digest(asdict(key)) if key is not None else "no key"


def load_items(subject: str, size: int, root: str | Path = ITEMS_ROOT, n: int = 5) -> list[np.ndarray]:
    """The first ``n`` photos of a DreamBooth subject, centre square crop resized to ``size`` px."""
    folder = Path(root) / subject
    paths = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(paths) < 3:
        raise FileNotFoundError(f"need >= 3 photos in {folder}, found {len(paths)}")
    out = []
    for p in paths[:n]:
        im = Image.open(p).convert("RGB")
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        out.append(np.asarray(im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)))
    return out


# 1. the downstream fine-tunes -----------------------------------------------------------------


def lora_finetune(base, photos, steps: int | None = None, seed: int = 0):
    cfg = FinetuneConfig(checkpoint_every=0, preview_n=0, seed=seed, **({"steps": steps} if steps else {}))
    return pipeline_with_lora(base, drain(finetune(base, photos, cfg)).lora, cfg.alpha)


def full_model_finetune(base, photos, steps: int, seed: int = 0):
    from core.finetune.full import full_finetune
    from core.layers.change import pipeline_with_state

    return pipeline_with_state(base, drain(full_finetune(base, photos, steps=steps, seed=seed)).state)


def scenarios(cfg: StudyConfig, faces_photos, items_photos) -> dict:
    """{scenario name: fine-tune(base) -> fine-tuned pipeline view}."""
    n = cfg.long_steps
    return {
        "before fine-tuning": lambda base: base,
        f"(a) default LoRA ({FinetuneConfig.steps} steps)": lambda base: lora_finetune(
            base, faces_photos, seed=cfg.seed
        ),
        f"(b) {n}-step LoRA": lambda base: lora_finetune(base, faces_photos, n, seed=cfg.seed),
        f"(c) {n}-step full fine-tune": lambda base: full_model_finetune(base, faces_photos, n, seed=cfg.seed),
        f"(d) DreamBooth items LoRA ({cfg.items_subject})": lambda base: lora_finetune(
            base, items_photos, seed=cfg.seed
        ),
    }


# 2. measures ----------------------------------------------------------------------------------


def verdict_row(v) -> dict:
    return {
        "vs_rate": v.vs_rate,
        "p_value": v.p_value,
        "watermarked": bool(v.watermarked),
        "rs_rate": getattr(v, "rs_rate", None),
        "mean_correlation": getattr(v, "mean_correlation", None),
    }


def class_samples(pipe, n: int, guidance: float = 1.0, steps: int = 25, batch: int = 16) -> list:
    """``n`` class-prompt samples, seeds 0, 1, ... in batches of 16 (the sampling of :mod:`core.studies.base`)."""
    from core.model.pipeline import sample_images
    from core.model.prompts import CLASS_PROMPT

    out = []
    for s in range(0, n, batch):
        out += sample_images(pipe, CLASS_PROMPT, n=min(batch, n - s), seed=s, steps=steps, guidance=guidance)
    return out


def real_heldout(n: int, group: str = "victims", root=None) -> np.ndarray:
    """``n`` aligned real crops of one identity group the base model never saw (round-robin over its
    identities: every identity's 1st photo, then every 2nd photo, ...)."""
    from core.faces import aligned, data

    groups = data.Split.load().paths(group, root)
    paths, k = [], 0
    while len(paths) < n and k < 20:
        paths += [ps[k] for ps in groups.values() if len(ps) > k]
        k += 1
    if len(paths) < n:
        raise ValueError(f"only {len(paths)} held-out photos in {group}, need {n}")
    return aligned.load_crops(paths[:n])


def quality(pipe, n: int, real_descriptors) -> dict:
    from core.faces import metrics
    from core.faces import recognition as faces

    ims = class_samples(pipe, n, 1.0)
    return {
        "detection_rate": metrics.detection_rate(ims),
        "frechet_to_real": metrics.frechet_distance(faces.describe(ims), real_descriptors),
    }


SHORT_FIRST = (0, 1, 4, 2, 3)  # scenario order of the run: before, (a), (d) first; the long (b), (c) last


def false_positive_summary(fps: dict) -> dict:
    return {
        k: {
            "models": len(v),
            "false_positives": sum(r["watermarked"] for r in v),
            "rate": (sum(r["watermarked"] for r in v) / len(v)) if v else None,
            "mean_vs_rate": float(np.mean([r["vs_rate"] for r in v])) if v else None,
            "max_vs_rate": max((r["vs_rate"] for r in v), default=None),
            "min_p_value": min((r["p_value"] for r in v), default=None),
            "per_model": v,
        }
        for k, v in fps.items()
    }


@dataclass
class WatermarkStudyResult:
    """The study's numbers (``watermark.json`` without the run's record), filled as it runs."""

    config: dict
    rows: list = field(default_factory=list)  # per (watermark, scenario): the verdict
    false_positives: dict = field(default_factory=dict)  # per watermark: false_positive_summary of the clean models
    quality: dict = field(default_factory=dict)  # per model (clean first): detection rate, Frechet distance
    complete: bool = False


@dataclass
class StudyKeys:
    """What the study's cached measurements are keyed by, besides the measurement itself."""

    settings: dict  # the settings a fine-tune depends on
    ids: dict  # watermark name -> (weights digest, key digest)
    faces: str  # digest of the photos of fine-tunes (a) (b) (c)
    items: str  # digest of the photos of fine-tune (d)


def measure_scenario(res: WatermarkStudyResult, keys: StudyKeys, name: str, tune, m: Watermarked) -> str:
    """Verify watermark ``m`` after fine-tune ``tune`` of its base (or from the cache); its log line."""

    def measure():
        t0 = time.perf_counter()
        return {**verdict_row(m.verify(tune(m.pipe))), "seconds": round(time.perf_counter() - t0, 1)}

    row = cached(
        "watermark_study", ["scenario", name, keys.ids[m.name], keys.settings, keys.faces, keys.items], measure
    )
    res.rows.append({"watermark": m.name, "scenario": name, **row})
    return (
        f"{m.name:9s} {name:40s} VS {row['vs_rate']:6.1%}  p {row['p_value']:.3g}  "
        f"{'yes' if row['watermarked'] else 'no'}  ({row['seconds']:.0f} s)"
    )


def measure_clean_model(
    res: WatermarkStudyResult, fps: dict, keys: StudyKeys, marks, clean, clean_id: str, i: int, photos, of: int
) -> str:
    """Every key against clean model ``i`` (a LoRA of the clean base, trained only if a key needs it)."""
    model = None
    for m in marks:

        def measure(m=m):
            nonlocal model
            model = model or lora_finetune(clean, photos, seed=CLEAN_SEED0 + i)
            return verdict_row(m.verify(model))

        fps[m.name].append(
            cached(
                "watermark_study",
                ["clean model", clean_id, digest(list(photos)), CLEAN_SEED0 + i, keys.ids[m.name][1]],
                measure,
            )
        )
    res.false_positives = false_positive_summary(fps)
    return f"clean model {i + 1}/{of}: " + ", ".join(
        f"{k} VS {v[-1]['vs_rate']:.1%} {'yes' if v[-1]['watermarked'] else 'no'}" for k, v in fps.items()
    )


def measure_quality(res: WatermarkStudyResult, name: str, pipe, n: int, real_descriptors, real_d: str) -> str:
    res.quality[name] = cached(
        "watermark_study", ["quality", weights_digest(pipe), n, real_d], lambda: quality(pipe, n, real_descriptors)
    )
    q = res.quality[name]
    return f"quality {name}: detection {q['detection_rate']:.3f} Frechet {q['frechet_to_real']:.4f}"


def study_plan(res, clean, marks, cfg: StudyConfig, faces_photos, items_photos, clean_photos, real_descriptors) -> list:
    """The study's measurements in run order (before fine-tuning, (a), (d), the false positives, quality,
    then the long (b), (c)), each a function () -> its log line that fills ``res``."""
    items = list(scenarios(cfg, faces_photos, items_photos).items())
    keep = {SCENARIO_KEYS.index(k) for k in cfg.chosen()}
    short = [items[i] for i in SHORT_FIRST[:3] if i in keep]
    long_ = [items[i] for i in SHORT_FIRST[3:] if i in keep]
    keys = StudyKeys(
        {k: v for k, v in asdict(cfg).items() if k not in ("n_clean", "quality_n", "only")},
        {m.name: (weights_digest(m.pipe), key_digest(m.key)) for m in marks},
        digest(list(faces_photos)),
        digest(list(items_photos)),
    )
    fps = {m.name: [] for m in marks}
    res.false_positives = false_positive_summary(fps)
    plan = [partial(measure_scenario, res, keys, name, tune, m) for name, tune in short for m in marks]
    clean_id = weights_digest(clean) if clean_photos else ""
    plan += [
        partial(measure_clean_model, res, fps, keys, marks, clean, clean_id, i, photos, len(clean_photos))
        for i, photos in enumerate(clean_photos)
    ]
    if cfg.quality_n:
        real_d = digest(np.asarray(real_descriptors))
        plan += [
            partial(measure_quality, res, name, pipe, cfg.quality_n, real_descriptors, real_d)
            for name, pipe in [("clean", clean)] + [(m.name, m.pipe) for m in marks]
        ]
    return plan + [partial(measure_scenario, res, keys, name, tune, m) for name, tune in long_ for m in marks]


def run_study(
    clean,
    marks: list[Watermarked],
    cfg: StudyConfig,
    faces_photos,
    items_photos,
    clean_photos,
    real_descriptors,
    save=lambda res: None,
    should_stop=never,
):
    """The study as a job (see the module docstring); ``clean_photos``: one photo set per clean model.
    A Progress per measurement, ``save(result so far)`` after each; Done(WatermarkStudyResult) (on a
    stop: what was measured, ``complete`` False, cancelled)."""
    res = WatermarkStudyResult(asdict(cfg))
    plan = study_plan(res, clean, marks, cfg, faces_photos, items_photos, clean_photos, real_descriptors)
    t0 = time.perf_counter()
    for step, measure in enumerate(plan, 1):
        if should_stop():
            yield Done(res, cancelled=True)
            return
        yield Message(measure())
        yield Progress("measurements", step, len(plan), time.perf_counter() - t0)
        save(res)
    res.complete = True
    yield Done(res)


def load_report(path: str | Path | None = None) -> dict | None:
    """The last study's results (``docs/results/watermark.json``), or None where none was run."""
    from core import load_report as read

    return read("watermark", path)


def scenario_order(name: str) -> str:
    return "" if name.startswith("before") else name  # "before", then "(a)".."(d)"


def scenario_table(rows: list[dict], cell, first: str = "scenario") -> list[str]:
    """Markdown lines of a scenario x watermark table of the study's ``rows``, each cell ``cell(row)``
    ("not measured" where a run has none)."""
    marks = list(dict.fromkeys(x["watermark"] for x in rows))
    by = {(x["watermark"], x["scenario"]): x for x in rows}
    lines = [f"| {first} | " + " | ".join(marks) + " |", "|---|" + "---|" * len(marks)]
    for sc in sorted(dict.fromkeys(x["scenario"] for x in rows), key=scenario_order):
        lines.append(
            f"| {sc} | " + " | ".join("not measured" if (m, sc) not in by else cell(by[m, sc]) for m in marks) + " |"
        )
    return lines


def to_markdown(r: dict) -> str:
    lines = [f"# Watermark robustness ({r.get('created', '')})", "", f"`{r.get('command', '')}`", ""]
    if not r.get("complete", True):
        lines += ["**Incomplete run**: stopped before every measurement was made; what is missing is absent below.", ""]
    if r.get("notes"):
        lines += [r["notes"], ""]
    lines += ["VS-rate (verdict: p-value below alpha) after each downstream fine-tune of the watermarked base:", ""]
    lines += scenario_table(
        r["rows"], lambda x: f"{x['vs_rate']:.1%} (p {x['p_value']:.2g}, {'yes' if x['watermarked'] else 'no'})"
    )
    lines += [
        "",
        "False positives on un-watermarked models (default-recipe LoRAs of the clean base, each on another "
        "shadow identity):",
        "",
        "| watermark | models | false positives | mean VS-rate | largest VS-rate | smallest p-value |",
        "|---|---|---|---|---|---|",
    ]
    for m, f in r["false_positives"].items():
        if f["models"]:
            lines.append(
                f"| {m} | {f['models']} | {f['false_positives']} ({f['rate']:.1%}) | {f['mean_vs_rate']:.1%} | "
                f"{f.get('max_vs_rate', float('nan')):.1%} | {f['min_p_value']:.2g} |"
            )
    if r["quality"]:
        q0 = r["quality"].get("clean")
        lines += [
            "",
            f"Quality ({r['config']['quality_n']} class-prompt samples each, 25 steps, guidance 1, the same "
            "seeds for every model; as `core.studies.base`):",
            "",
            "| model | face-detection rate | Frechet distance to real faces |",
            "|---|---|---|",
        ]
        for k, q in r["quality"].items():
            d = "" if q0 is None or k == "clean" else (f" ({q['detection_rate'] - q0['detection_rate']:+.3f})")
            f = "" if q0 is None or k == "clean" else (f" ({(q['frechet_to_real'] / q0['frechet_to_real'] - 1):+.1%})")
            lines.append(f"| {k} | {q['detection_rate']:.3f}{d} | {q['frechet_to_real']:.4f}{f} |")
    return "\n".join(lines) + "\n"


# 3. CLI ---------------------------------------------------------------------------------------


@dataclass
class Args(StudyConfig):
    """Robustness study of the ownership watermarks."""

    model: str | None = None  # the clean base model folder or hub id (None: the embedded one)
    aiao: str | None = None  # AIAO: delta file or pipeline folder (+ --aiao-key); None: the shipped one, else embedded
    aiao_key: str | None = None  # the key file of --aiao
    backdoor: str | None = None  # backdoor watermark: delta file or pipeline folder (+ --backdoor-key); None: as --aiao
    backdoor_key: str | None = None  # the key file of --backdoor
    data: str | None = None  # LFW folder (None: $LEAKLAB_LFW or ../shared/data/lfw-deepfunneled)
    items: str = str(ITEMS_ROOT)  # DreamBooth items folder
    out: str = str(RESULTS)  # folder of watermark.json and watermark.md
    notes: str = ""  # a sentence written under the command in watermark.md


def watermarked_bases(clean, a: Args) -> tuple[list[Watermarked], dict]:
    """(the watermarks under study, where each came from): given by flags, else shipped, else embedded
    by this run."""
    from core.model.pipeline import load_pipeline
    from core.watermark.aiao import WatermarkConfig, WatermarkKey, choose_lazy_layers, embed_watermark, verify_watermark
    from core.watermark.backdoor import BackdoorKey, embed_backdoor, verify_backdoor
    from core.watermark.formats import SHIPPED, KeyFileError, load_delta, watermarked_pipeline
    from core.watermark.owner import owner_latents, probe_photos
    from core.watermark.shipped import shipped_watermark

    sources = {}

    def base(name, path, key_file, key_cls, embed):
        if path:
            sources[name] = path
            pipe = load_delta(clean, path) if str(path).endswith(".safetensors") else load_pipeline(path)
            return pipe, key_cls.load(key_file)
        try:
            pipe, key = shipped_watermark(name, clean)
            sources[name] = f"shipped (assets/watermark/{SHIPPED[name][0]})"
        except KeyFileError:
            pipe, key = embed()
            sources[name] = "embedded by this run (defaults)"
        return pipe, key

    def embed_aiao():
        wcfg = WatermarkConfig(seed=a.seed)
        found = drain(choose_lazy_layers(clean, probe_photos(clean, root=a.data), wcfg))
        res = drain(
            embed_watermark(
                clean,
                owner_latents(clean, 1024, a.data),
                found.layers,
                wcfg,
                lazy_scores=found.scores,
                output_drift=found.output_drift,
            )
        )
        return watermarked_pipeline(clean, res.unet), res.key

    def embed_bd():
        res = drain(embed_backdoor(clean, owner_latents(clean, 1024, a.data)))
        return watermarked_pipeline(clean, res.unet, res.text_encoder), res.key

    aiao_pipe, aiao_key = base("AIAO", a.aiao, a.aiao_key, WatermarkKey, embed_aiao)
    bd_pipe, bd_key = base("backdoor", a.backdoor, a.backdoor_key, BackdoorKey, embed_bd)
    return [
        Watermarked("AIAO", aiao_pipe, lambda p: verify_watermark(p, aiao_key), aiao_key),
        Watermarked("backdoor", bd_pipe, lambda p: verify_backdoor(p, bd_key), bd_key),
    ], sources


def study_photos(clean, a: Args) -> tuple[list, list, list, np.ndarray]:
    """(the shadow identities used: the first for fine-tunes (a)-(c), one per clean model after it; their
    photo sets; the items subject's photos; dlib descriptors of real unseen faces)."""
    from core.faces import aligned, data
    from core.faces import recognition as faces
    from core.model.pipeline import image_size_of
    from core.watermark.owner import probe_identity

    size = image_size_of(clean)
    people = data.Split.load().paths("shadow", a.data)
    probe = probe_identity(people)  # the owner's probe saw these: no downstream fine-tune uses them
    names = [k for k, v in people.items() if len(v) >= a.photos and k != probe][: a.n_clean + 1]
    sets = [list(aligned.load_crops(people[k][: a.photos], size=size)) for k in names]
    items = load_items(a.items_subject, size, a.items, a.photos)
    real = faces.describe(real_heldout(a.quality_n, "victims", a.data)) if a.quality_n else np.zeros((0, 128))
    return names, sets, items, real


def main(argv=None):
    from core.cli import command_line, config_of, parse
    from core.model.pipeline import load_pipeline
    from core.model.prior import base_fingerprint

    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(Args, argv, description=__doc__.split("\n")[0])
    cfg = config_of(a, StudyConfig)
    t0 = time.perf_counter()
    # 1. the clean and the watermarked bases; 2. the photos
    clean = load_pipeline(a.model)
    marks, sources = watermarked_bases(clean, a)
    names, sets, items, real = study_photos(clean, a)
    # 3. the study, written after every measurement
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        command=command_line("core.studies.watermark", argv),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        base=base_fingerprint(clean),
        notes=a.notes,
        watermarks=sources,
        faces_identity=names[0],
        clean_identities=names[1:],
    )

    def save(res):
        r = asdict(res) | meta | {"minutes": round((time.perf_counter() - t0) / 60, 1)}
        (out / "watermark.json").write_text(json.dumps(r, indent=1) + "\n")
        (out / "watermark.md").write_text(to_markdown(r))
        return r

    res = run_with_progress_bar(run_study(clean, marks, cfg, sets[0], items, sets[1:], real, save=save))
    print(to_markdown(save(res)))


if __name__ == "__main__":
    main()
