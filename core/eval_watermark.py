"""Robustness study of the ownership watermarks: ``python -m core.eval_watermark``.

Protocol (issue 5, ``METHODS.md`` section 2):
1. the clean base, the AIAO-watermarked base (:mod:`core.watermark`) and the backdoor-watermarked base
   (:mod:`core.backdoor_watermark`), each with its key (embedded here, or given with ``--aiao`` /
   ``--backdoor`` and their keys);
2. each watermarked base is verified as it is, then after each downstream fine-tune *of that base*:
   (a) the default LoRA recipe (:mod:`core.finetune`), (b) a ``--long-steps`` LoRA, (c) a
   ``--long-steps`` full fine-tune (:func:`core.layers.full_finetune`), all three on the photos of a
   shadow identity (public faces), and (d) the default LoRA recipe on a subject of the DreamBooth
   items set (``../shared/data/dreambooth``: centre square crop at the model's resolution);
3. false positives: ``--n-clean`` un-watermarked models, fresh default-recipe LoRAs of the *clean*
   base on other shadow identities (one each, its own seed); a false positive is a "watermarked"
   verdict of either key on one of them;
4. quality cost: ``--quality-n`` class-prompt samples of each base (25 steps, guidance 1, as
   :mod:`core.eval_base`): face-detection rate and Frechet distance of dlib descriptors to as many
   real unseen faces (victim identities).
Writes ``<out>/watermark.json`` and ``watermark.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from core import PROJECT_ROOT
from core.events import drain
from core.finetune import FinetuneConfig, finetune, pipeline_with_lora

RESULTS = PROJECT_ROOT / "docs" / "results"
ITEMS_ROOT = PROJECT_ROOT.parent / "shared" / "data" / "dreambooth"
CLEAN_SEED0 = 700_000  # seed of clean model i's LoRA


@dataclass
class StudyConfig:
    long_steps: int = 2000  # steps of the long LoRA and of the full fine-tune
    n_clean: int = 20  # un-watermarked models for the false-positive rate
    quality_n: int = 256  # samples per base for the quality measures
    photos: int = 5  # photos per fine-tune
    items_subject: str = "dog"  # DreamBooth items subject of fine-tune (d)
    seed: int = 0

    def __post_init__(self):
        if self.long_steps < 1 or self.n_clean < 0 or self.quality_n < 2 or not 3 <= self.photos <= 10:
            raise ValueError(f"long_steps >= 1, n_clean >= 0, quality_n >= 2, photos 3..10; got {self.long_steps!r}, "
                             f"{self.n_clean!r}, {self.quality_n!r}, {self.photos!r}")


@dataclass
class Watermarked:
    """One watermark under study: its name, its watermarked pipeline and a verify(pipe) -> result."""

    name: str
    pipe: object
    verify: object  # callable: pipeline view -> Verification / BackdoorVerification


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
    from core.layers import full_finetune, pipeline_with_state

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
    from core import faces, metrics
    from core.eval_base import sample_many

    ims = sample_many(pipe, n, 1.0)
    return {"detection_rate": metrics.detection_rate(ims),
            "frechet_to_real": metrics.frechet_distance(faces.describe(ims), real_descriptors)}


def run_study(clean, marks: list[Watermarked], cfg: StudyConfig, faces_photos, items_photos, clean_photos,
              real_descriptors, log=print) -> dict:
    """The study's numbers (see the module docstring); ``clean_photos``: one photo set per clean model."""
    rows = []
    for name, tune in scenarios(cfg, faces_photos, items_photos).items():
        for m in marks:
            t0 = time.perf_counter()
            v = m.verify(tune(m.pipe))
            rows.append({"watermark": m.name, "scenario": name, **verdict_row(v), "seconds": round(time.perf_counter() - t0, 1)})
            log(f"{m.name:9s} {name:40s} VS {v.vs_rate:6.1%}  p {v.p_value:.3g}  {'yes' if v.watermarked else 'no'}")
    fps = {m.name: [] for m in marks}
    for i, photos in enumerate(clean_photos):
        model = lora_finetune(clean, photos, seed=CLEAN_SEED0 + i)
        for m in marks:
            fps[m.name].append(verdict_row(m.verify(model)))
        log(f"clean model {i + 1}/{len(clean_photos)}: " + ", ".join(
            f"{k} VS {v[-1]['vs_rate']:.1%} {'yes' if v[-1]['watermarked'] else 'no'}" for k, v in fps.items()))
    false_pos = {k: {"models": len(v), "false_positives": sum(r["watermarked"] for r in v),
                     "rate": (sum(r["watermarked"] for r in v) / len(v)) if v else None,
                     "mean_vs_rate": float(np.mean([r["vs_rate"] for r in v])) if v else None,
                     "min_p_value": min((r["p_value"] for r in v), default=None)} for k, v in fps.items()}
    qual = {"clean": quality(clean, cfg.quality_n, real_descriptors)}
    for m in marks:
        qual[m.name] = quality(m.pipe, cfg.quality_n, real_descriptors)
    log("quality: " + ", ".join(f"{k} detection {q['detection_rate']:.3f} Frechet {q['frechet_to_real']:.4f}"
                                for k, q in qual.items()))
    return {"config": asdict(cfg), "rows": rows, "false_positives": false_pos, "quality": qual}


def to_markdown(r: dict) -> str:
    marks = list(dict.fromkeys(x["watermark"] for x in r["rows"]))
    lines = [f"# Watermark robustness ({r.get('created', '')})", "", f"`{r.get('command', '')}`", "",
             "VS-rate (verdict: p-value below alpha) after each downstream fine-tune of the watermarked base:", "",
             "| scenario | " + " | ".join(marks) + " |", "|---|" + "---|" * len(marks)]
    for sc in dict.fromkeys(x["scenario"] for x in r["rows"]):
        cells = []
        for m in marks:
            x = next(x for x in r["rows"] if x["scenario"] == sc and x["watermark"] == m)
            cells.append(f"{x['vs_rate']:.1%} (p {x['p_value']:.2g}, {'yes' if x['watermarked'] else 'no'})")
        lines.append(f"| {sc} | " + " | ".join(cells) + " |")
    lines += ["", "False positives on un-watermarked models (default-recipe LoRAs of the clean base):", "",
              "| watermark | models | false positives | mean VS-rate | smallest p-value |", "|---|---|---|---|---|"]
    for m, f in r["false_positives"].items():
        if f["models"]:
            lines.append(f"| {m} | {f['models']} | {f['false_positives']} ({f['rate']:.1%}) | {f['mean_vs_rate']:.1%} | "
                         f"{f['min_p_value']:.2g} |")
    lines += ["", f"Quality ({r['config']['quality_n']} class-prompt samples each):", "",
              "| model | face-detection rate | Frechet distance to real faces |", "|---|---|---|"]
    lines += [f"| {k} | {q['detection_rate']:.3f} | {q['frechet_to_real']:.4f} |" for k, q in r["quality"].items()]
    return "\n".join(lines) + "\n"


# 3. CLI ---------------------------------------------------------------------------------------


def main(argv=None):
    from core import data, faces
    from core.backdoor_watermark import BackdoorKey, embed_backdoor, verify_backdoor
    from core.cli import add_config_flags, config_from_args
    from core.eval_base import real_heldout
    from core.pipeline import image_size_of, load_pipeline
    from core.watermark import (
        WatermarkConfig,
        WatermarkKey,
        choose_lazy_layers,
        command_line,
        embed_watermark,
        owner_latents,
        probe_photos,
        verify_watermark,
        watermarked_pipeline,
    )

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="the clean base (default: embedded)")
    ap.add_argument("--aiao", default=None, help="AIAO-watermarked pipeline folder (with --aiao-key); default: embed one")
    ap.add_argument("--aiao-key", default=None)
    ap.add_argument("--backdoor", default=None, help="backdoor-watermarked pipeline folder (with --backdoor-key)")
    ap.add_argument("--backdoor-key", default=None)
    ap.add_argument("--data", default=None, help="LFW folder")
    ap.add_argument("--items", default=str(ITEMS_ROOT), help="DreamBooth items folder")
    ap.add_argument("--out", default=str(RESULTS))
    add_config_flags(ap, StudyConfig)
    a = vars(ap.parse_args(argv))
    cfg = config_from_args(StudyConfig, a)
    t0 = time.perf_counter()
    clean = load_pipeline(a["model"])
    size = image_size_of(clean)

    # 1. the watermarked bases
    if a["aiao"]:
        aiao_pipe, aiao_key = load_pipeline(a["aiao"]), WatermarkKey.load(a["aiao_key"])
    else:
        wcfg = WatermarkConfig(seed=cfg.seed)
        lazy, scores = drain(choose_lazy_layers(clean, probe_photos(clean, root=a["data"]), wcfg))
        res = drain(embed_watermark(clean, owner_latents(clean, 1024, a["data"]), lazy, wcfg, lazy_scores=scores))
        aiao_pipe, aiao_key = watermarked_pipeline(clean, res.unet), res.key
    if a["backdoor"]:
        bd_pipe, bd_key = load_pipeline(a["backdoor"]), BackdoorKey.load(a["backdoor_key"])
    else:
        res = drain(embed_backdoor(clean, owner_latents(clean, 1024, a["data"])))
        bd_pipe, bd_key = watermarked_pipeline(clean, res.unet), res.key
    marks = [Watermarked("AIAO", aiao_pipe, lambda p: verify_watermark(p, aiao_key)),
             Watermarked("backdoor", bd_pipe, lambda p: verify_backdoor(p, bd_key))]

    # 2. photos: shadow identities (public faces), an items subject, real unseen faces
    people = data.Split.load().paths("shadow", a["data"])
    names = [k for k, v in people.items() if len(v) >= cfg.photos][: cfg.n_clean + 1]
    sets = [list(data.load_crops(people[k][: cfg.photos], size=size)) for k in names]
    items = load_items(cfg.items_subject, size, a["items"], cfg.photos)
    real = faces.describe(real_heldout(cfg.quality_n, "victims", a["data"]))

    # 3. the study
    r = run_study(clean, marks, cfg, sets[0], items, sets[1:], real)
    r.update(command=command_line("core.eval_watermark", argv), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
             minutes=round((time.perf_counter() - t0) / 60, 1), faces_identity=names[0], clean_identities=names[1:])
    out = Path(a["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "watermark.json").write_text(json.dumps(r, indent=1) + "\n")
    md = to_markdown(r)
    (out / "watermark.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
