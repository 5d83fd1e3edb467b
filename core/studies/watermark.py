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

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from core import PROJECT_ROOT, RESULTS
from core.cache import cached, digest
from core.events import drain
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
    seed: int = 0

    def __post_init__(self):
        if self.long_steps < 1 or self.n_clean < 0 or 0 != self.quality_n < 2 or not 3 <= self.photos <= 10:
            raise ValueError(f"long_steps >= 1, n_clean >= 0, quality_n 0 or >= 2, photos 3..10; got {self.long_steps!r}, "
                             f"{self.n_clean!r}, {self.quality_n!r}, {self.photos!r}")
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
        f"(a) default LoRA ({FinetuneConfig.steps} steps)": lambda base: lora_finetune(base, faces_photos, seed=cfg.seed),
        f"(b) {n}-step LoRA": lambda base: lora_finetune(base, faces_photos, n, seed=cfg.seed),
        f"(c) {n}-step full fine-tune": lambda base: full_model_finetune(base, faces_photos, n, seed=cfg.seed),
        f"(d) DreamBooth items LoRA ({cfg.items_subject})": lambda base: lora_finetune(base, items_photos, seed=cfg.seed),
    }


# 2. measures ----------------------------------------------------------------------------------


def verdict_row(v) -> dict:
    return {"vs_rate": v.vs_rate, "p_value": v.p_value, "watermarked": bool(v.watermarked),
            "rs_rate": getattr(v, "rs_rate", None), "mean_correlation": getattr(v, "mean_correlation", None)}


def quality(pipe, n: int, real_descriptors) -> dict:
    from core.faces import recognition as faces
    from core.faces import metrics
    from core.studies.base import sample_many

    ims = sample_many(pipe, n, 1.0)
    return {"detection_rate": metrics.detection_rate(ims),
            "frechet_to_real": metrics.frechet_distance(faces.describe(ims), real_descriptors)}


SHORT_FIRST = (0, 1, 4, 2, 3)  # scenario order of the run: before, (a), (d) first; the long (b), (c) last


def false_positive_summary(fps: dict) -> dict:
    return {k: {"models": len(v), "false_positives": sum(r["watermarked"] for r in v),
                "rate": (sum(r["watermarked"] for r in v) / len(v)) if v else None,
                "mean_vs_rate": float(np.mean([r["vs_rate"] for r in v])) if v else None,
                "max_vs_rate": max((r["vs_rate"] for r in v), default=None),
                "min_p_value": min((r["p_value"] for r in v), default=None), "per_model": v} for k, v in fps.items()}


def run_study(clean, marks: list[Watermarked], cfg: StudyConfig, faces_photos, items_photos, clean_photos,
              real_descriptors, log=print, save=lambda r: None) -> dict:
    """The study's numbers (see the module docstring); ``clean_photos``: one photo set per clean model.
    ``save(partial result)`` is called after every measurement."""
    rows, fps, qual = [], {m.name: [] for m in marks}, {}
    r = {"config": asdict(cfg), "rows": rows, "false_positives": false_positive_summary(fps), "quality": qual,
         "complete": False}
    items = list(scenarios(cfg, faces_photos, items_photos).items())
    keep = {SCENARIO_KEYS.index(k) for k in cfg.chosen()}
    short = [items[i] for i in SHORT_FIRST[:3] if i in keep]
    long_ = [items[i] for i in SHORT_FIRST[3:] if i in keep]

    settings = {k: v for k, v in asdict(cfg).items() if k not in ("n_clean", "quality_n", "only")}
    ids = {m.name: (weights_digest(m.pipe), key_digest(m.key)) for m in marks}
    faces_d, items_d = digest(list(faces_photos)), digest(list(items_photos))

    def scenario(name, tune):
        for m in marks:
            def measure():
                t0 = time.perf_counter()
                return {**verdict_row(m.verify(tune(m.pipe))), "seconds": round(time.perf_counter() - t0, 1)}

            row = cached("watermark_study", ["scenario", name, ids[m.name], settings, faces_d, items_d], measure)
            rows.append({"watermark": m.name, "scenario": name, **row})
            log(f"{m.name:9s} {name:40s} VS {row['vs_rate']:6.1%}  p {row['p_value']:.3g}  "
                f"{'yes' if row['watermarked'] else 'no'}  ({row['seconds']:.0f} s)")
            save(r)

    for name, tune in short:
        scenario(name, tune)
    clean_id = weights_digest(clean)
    for i, photos in enumerate(clean_photos):
        model = None
        for m in marks:
            def measure():
                nonlocal model
                model = model or lora_finetune(clean, photos, seed=CLEAN_SEED0 + i)
                return verdict_row(m.verify(model))

            fps[m.name].append(cached("watermark_study", ["clean model", clean_id, digest(list(photos)),
                                                          CLEAN_SEED0 + i, ids[m.name][1]], measure))
        r["false_positives"] = false_positive_summary(fps)
        save(r)
        log(f"clean model {i + 1}/{len(clean_photos)}: " + ", ".join(
            f"{k} VS {v[-1]['vs_rate']:.1%} {'yes' if v[-1]['watermarked'] else 'no'}" for k, v in fps.items()))
    real_d = digest(np.asarray(real_descriptors))
    for name, pipe in ([("clean", clean)] + [(m.name, m.pipe) for m in marks]) if cfg.quality_n else []:
        qual[name] = cached("watermark_study", ["quality", weights_digest(pipe), cfg.quality_n, real_d],
                            lambda: quality(pipe, cfg.quality_n, real_descriptors))
        save(r)
        log(f"quality {name}: detection {qual[name]['detection_rate']:.3f} Frechet {qual[name]['frechet_to_real']:.4f}")
    for name, tune in long_:
        scenario(name, tune)
    r["complete"] = True
    return r


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
        lines.append(f"| {sc} | " + " | ".join("not measured" if (m, sc) not in by else cell(by[m, sc])
                                              for m in marks) + " |")
    return lines


def to_markdown(r: dict) -> str:
    lines = [f"# Watermark robustness ({r.get('created', '')})", "", f"`{r.get('command', '')}`", ""]
    if not r.get("complete", True):
        lines += ["**Incomplete run**: stopped before every measurement was made; what is missing is absent below.", ""]
    if r.get("notes"):
        lines += [r["notes"], ""]
    lines += ["VS-rate (verdict: p-value below alpha) after each downstream fine-tune of the watermarked base:", ""]
    lines += scenario_table(r["rows"], lambda x: f"{x['vs_rate']:.1%} (p {x['p_value']:.2g}, "
                                                 f"{'yes' if x['watermarked'] else 'no'})")
    lines += ["", "False positives on un-watermarked models (default-recipe LoRAs of the clean base, each on another "
                  "shadow identity):", "",
              "| watermark | models | false positives | mean VS-rate | largest VS-rate | smallest p-value |",
              "|---|---|---|---|---|---|"]
    for m, f in r["false_positives"].items():
        if f["models"]:
            lines.append(f"| {m} | {f['models']} | {f['false_positives']} ({f['rate']:.1%}) | {f['mean_vs_rate']:.1%} | "
                         f"{f.get('max_vs_rate', float('nan')):.1%} | {f['min_p_value']:.2g} |")
    if r["quality"]:
        q0 = r["quality"].get("clean")
        lines += ["", f"Quality ({r['config']['quality_n']} class-prompt samples each, 25 steps, guidance 1, the same "
                      "seeds for every model; as `core.studies.base`):", "",
                  "| model | face-detection rate | Frechet distance to real faces |", "|---|---|---|"]
        for k, q in r["quality"].items():
            d = "" if q0 is None or k == "clean" else (
                f" ({q['detection_rate'] - q0['detection_rate']:+.3f})")
            f = "" if q0 is None or k == "clean" else (
                f" ({(q['frechet_to_real'] / q0['frechet_to_real'] - 1):+.1%})")
            lines.append(f"| {k} | {q['detection_rate']:.3f}{d} | {q['frechet_to_real']:.4f}{f} |")
    return "\n".join(lines) + "\n"


# 3. CLI ---------------------------------------------------------------------------------------


def main(argv=None):
    from core.faces import aligned, data
    from core.faces import recognition as faces
    from core.watermark.backdoor import BackdoorKey, embed_backdoor, verify_backdoor
    from core.cli import add_config_flags, command_line, config_from_args
    from core.studies.base import real_heldout
    from core.model.pipeline import image_size_of, load_pipeline
    from core.watermark.aiao import WatermarkConfig, WatermarkKey, choose_lazy_layers, embed_watermark, verify_watermark
    from core.watermark.formats import SHIPPED, KeyFileError, load_delta, watermarked_pipeline
    from core.watermark.owner import owner_latents, probe_identity, probe_photos
    from core.watermark.shipped import shipped_watermark

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="the clean base (default: embedded)")
    ap.add_argument("--aiao", default=None, help="AIAO watermark: a delta file over --model or a pipeline folder (with "
                                                 "--aiao-key); default: the shipped one, else embed one")
    ap.add_argument("--aiao-key", default=None)
    ap.add_argument("--backdoor", default=None, help="backdoor watermark: delta file or pipeline folder (with --backdoor-key)")
    ap.add_argument("--backdoor-key", default=None)
    ap.add_argument("--data", default=None, help="LFW folder")
    ap.add_argument("--items", default=str(ITEMS_ROOT), help="DreamBooth items folder")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--notes", default="", help="a sentence written under the command in watermark.md")
    add_config_flags(ap, StudyConfig)
    a = vars(ap.parse_args(argv))
    cfg = config_from_args(StudyConfig, a)
    t0 = time.perf_counter()
    clean = load_pipeline(a["model"])
    size = image_size_of(clean)

    def given(path):
        return load_delta(clean, path) if str(path).endswith(".safetensors") else load_pipeline(path)

    # 1. the watermarked bases: given by flags, else shipped, else embedded by this run
    sources = {}

    def base(name, path, key_file, key_cls, embed):
        if path:
            sources[name] = path
            return given(path), key_cls.load(key_file)
        try:
            pipe, key = shipped_watermark(name, clean)
            sources[name] = f"shipped (assets/watermark/{SHIPPED[name][0]})"
        except KeyFileError:
            pipe, key = embed()
            sources[name] = "embedded by this run (defaults)"
        return pipe, key

    def embed_aiao():
        wcfg = WatermarkConfig(seed=cfg.seed)
        lazy, scores = drain(choose_lazy_layers(clean, probe_photos(clean, root=a["data"]), wcfg))
        res = drain(embed_watermark(clean, owner_latents(clean, 1024, a["data"]), lazy, wcfg, lazy_scores=scores))
        return watermarked_pipeline(clean, res.unet), res.key

    def embed_bd():
        res = drain(embed_backdoor(clean, owner_latents(clean, 1024, a["data"])))
        return watermarked_pipeline(clean, res.unet, res.text_encoder), res.key

    aiao_pipe, aiao_key = base("AIAO", a["aiao"], a["aiao_key"], WatermarkKey, embed_aiao)
    bd_pipe, bd_key = base("backdoor", a["backdoor"], a["backdoor_key"], BackdoorKey, embed_bd)
    marks = [Watermarked("AIAO", aiao_pipe, lambda p: verify_watermark(p, aiao_key), aiao_key),
             Watermarked("backdoor", bd_pipe, lambda p: verify_backdoor(p, bd_key), bd_key)]

    # 2. photos: shadow identities (public faces), an items subject, real unseen faces
    people = data.Split.load().paths("shadow", a["data"])
    probe = probe_identity(people)  # the owner's probe saw these: no downstream fine-tune uses them
    names = [k for k, v in people.items() if len(v) >= cfg.photos and k != probe][: cfg.n_clean + 1]
    sets = [list(aligned.load_crops(people[k][: cfg.photos], size=size)) for k in names]
    items = load_items(cfg.items_subject, size, a["items"], cfg.photos)
    real = faces.describe(real_heldout(cfg.quality_n, "victims", a["data"])) if cfg.quality_n else np.zeros((0, 128))

    # 3. the study, written after every measurement
    out = Path(a["out"])
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(command=command_line("core.studies.watermark", argv), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                notes=a["notes"], watermarks=sources, faces_identity=names[0], clean_identities=names[1:])

    def save(r):
        r.update(meta, minutes=round((time.perf_counter() - t0) / 60, 1))
        (out / "watermark.json").write_text(json.dumps(r, indent=1) + "\n")
        (out / "watermark.md").write_text(to_markdown(r))

    r = run_study(clean, marks, cfg, sets[0], items, sets[1:], real, save=save)
    save(r)
    print(to_markdown(r))


if __name__ == "__main__":
    main()
