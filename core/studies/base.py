"""Quality of a base model, and of another one on the same protocol: ``python -m core.studies.base``.

For the class prompt, per base model (``--model``, and each ``--compare`` model in the same run):
- face-detection rate (dlib frontal detector, :func:`core.faces.recognition.has_face`) of ``--n``
  samples;
- Frechet distance between dlib descriptors of the samples and of ``--n`` real faces the base model
  never saw, for two sources: LFW *victims* (set A; the reference set B is as many photos of shadow
  identities) and held-out UTKFace chips (set A: the first ``--n`` of the held-out chips; B: the
  next ``--n``). Each source's real-vs-real distance (B to A) is printed beside it, for scale;
- prompt sensitivity (:func:`prompt_sensitivity`): how much the UNet's prediction moves when only
  the prompt changes (a DreamBooth trigger can only bind a subject if this is well above 0);
- the wall time to sample 4 images with 25 steps (the same run, the same machine);
- a sample grid (the model's own faces, no real person) beside the report.
Real faces are aligned like a visitor's photo, in *each model's own crop geometry* (its resolution;
the template zoom it was trained with), so every model is compared with the same photos cropped as it
draws them. Writes ``<out>/eval_base.json``, ``eval_base.md`` and ``base_samples.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core import RESULTS
from core.cli import shell_word
from core.events import Done, Message, Progress, never, run_with_progress_bar
from core.faces import aligned, data, ingest, metrics
from core.faces import recognition as faces
from core.model.pipeline import image_size_of, load_pipeline, sample_images, time_sampling
from core.model.prompts import APPEARANCE_WORDS, CLASS_PROMPT, appearance_caption, instance_prompt, trigger_words

# crop geometry of bases trained before the 128 px base (LFW's central 128 px box, 64 px)
LEGACY_ZOOM = 1.0


@dataclass
class BaseStudyConfig:
    n: int = 256  # samples per model, and real faces per set
    steps: int = 25  # sampler steps (DPM-Solver++)
    guidance: float = 1.0  # classifier-free guidance scale of the samples
    data: str | None = None  # LFW folder (default $LEAKLAB_LFW or ../shared/data/lfw-deepfunneled)
    utkface: str | None = None  # UTKFace folder (default $LEAKLAB_UTKFACE or ../data/UTKFace); "none" = LFW only


@dataclass
class ModelReport:
    """One base model's row set."""

    model: str
    size: int
    zoom: float
    detection_rate: float
    frechet: dict  # source -> Frechet distance of the samples to that source's set A
    real: dict  # source -> {"frechet_b_to_a", "detection_rate_a"}
    prompt_sensitivity: dict
    seconds_4_images: float
    grid: list = field(default_factory=list, repr=False)  # 32 samples (uint8), not saved in the JSON


def template_for(zoom: float) -> np.ndarray:
    """The face template at a given zoom (the shipped template re-spread about the crop centre)."""
    shipped = json.loads(ingest.TEMPLATE_FILE.read_text())
    t = np.asarray(shipped["landmarks_128"], np.float64)
    c = ingest.TEMPLATE_SIZE / 2
    return (t - c) / float(shipped.get("zoom", 1.0)) * zoom + c


def model_zoom(pipe) -> float:
    """The crop zoom a base was trained with: recorded in its ``train_config.json`` (a base of this
    project without the record predates the zoom: 1.0); any other model: the current template's."""
    rec = Path(pipe.config.get("_name_or_path") or "") / "train_config.json"
    try:
        return float(json.loads(rec.read_text()).get("template_zoom", LEGACY_ZOOM))
    except (OSError, ValueError):
        return ingest.TEMPLATE_ZOOM


def real_paths(n: int, cfg: BaseStudyConfig) -> dict[str, tuple[list, list]]:
    """Source -> (set A paths, set B paths) of real faces no base model saw (2n candidates each,
    so photos where dlib finds no face can be skipped)."""
    split = data.Split.load()

    def round_robin(group):
        groups = split.paths(group, cfg.data)
        out, k = [], 0
        while len(out) < 2 * n and k < 20:
            out += [ps[k] for ps in groups.values() if len(ps) > k]
            k += 1
        return out

    sets = {"LFW": (round_robin("victims"), round_robin("shadow"))}
    if cfg.utkface != "none":
        files = data.utkface_files(cfg.utkface)
        names = data.utkface_heldout(files)  # the chips the 128 px base's build kept out (its defaults)
        held = sorted(f for f in files if f.name in names)
        sets["UTKFace"] = (held[: len(held) // 2], held[len(held) // 2 :])
    return sets


def aligned_set(paths, n: int, size: int, template: np.ndarray) -> np.ndarray:
    """The first ``n`` of ``paths`` where dlib finds a face, aligned at ``size`` px."""
    out = []
    for p in paths:
        a = aligned.align_file(p, size, template)
        if a is not None:
            out.append(a.crop)
        if len(out) == n:
            break
    return np.stack(out)


@torch.no_grad()
def prompt_sensitivity(pipe, n: int = 32, timesteps=(900, 500, 200), seed: int = 0) -> dict:
    """Relative change ||f(prompt A) - f(prompt B)|| / ||f(prompt A)|| of the UNet's prediction on the
    same noisy latents, averaged over ``timesteps``, for three prompt pairs: two different appearance
    captions, the class prompt vs an appearance caption, and the class prompt vs a fresh trigger's
    instance prompt (a reserved word pre-training never saw). A model that ignores its prompt gives ~0."""
    from core.finetune.lora import encode_prompt

    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.randn(shape, generator=g).to(pipe.device, unet.dtype)
    half = len(APPEARANCE_WORDS) // 2
    pick = lambda: torch.randint(0, half, (n,), generator=g).tolist()
    words_a, words_b = APPEARANCE_WORDS[:half], APPEARANCE_WORDS[half:]
    caps = lambda: [appearance_caption(words_a[i], words_b[j]) for i, j in zip(pick(), pick())]
    emb = lambda prompts: torch.cat([encode_prompt(pipe, p) for p in prompts])
    a, b = emb(caps()), emb(caps())
    cls = emb([CLASS_PROMPT] * n)
    trig = emb([instance_prompt(w) for w in trigger_words()[:n]])
    pairs = {
        "appearance A vs appearance B": (a, b),
        "class prompt vs appearance": (cls, a),
        "class prompt vs unseen trigger": (cls, trig),
    }
    out = {}
    for name, (e1, e2) in pairs.items():
        vals = []
        for t in timesteps:
            tt = torch.full((n,), t, device=pipe.device)
            p1, p2 = unet(x, tt, e1.to(unet.dtype)).sample.float(), unet(x, tt, e2.to(unet.dtype)).sample.float()
            vals.append(float((p1 - p2).norm() / p1.norm()))
        out[name] = float(np.mean(vals))
    return out


def evaluate_model(model, cfg: BaseStudyConfig, should_stop=never):
    """Generator of one base model's progress events; returns its ModelReport (None if stopped)."""
    pipe = load_pipeline(model)
    size, zoom = image_size_of(pipe), model_zoom(pipe)
    name = shell_word(str(model)) if model else "embedded"
    yield Message(f"{name}: {size} px, crop zoom {zoom}")
    ims, batch = [], 16
    for s in range(0, cfg.n, batch):
        if should_stop():
            return None
        ims += sample_images(
            pipe, CLASS_PROMPT, n=min(batch, cfg.n - s), seed=s, steps=cfg.steps, guidance=cfg.guidance
        )
        yield Progress(f"sampling {name}", len(ims), cfg.n, 0.0)
    desc = faces.describe(ims)
    template = template_for(zoom)
    frechet, real = {}, {}
    for source, (pa, pb) in real_paths(cfg.n, cfg).items():
        a, b = aligned_set(pa, cfg.n, size, template), aligned_set(pb, cfg.n, size, template)
        da, db = faces.describe(a), faces.describe(b)
        frechet[source] = metrics.frechet_distance(desc, da)
        real[source] = dict(
            frechet_b_to_a=metrics.frechet_distance(db, da),
            detection_rate_a=metrics.detection_rate(a),
            n_a=len(a),
            n_b=len(b),
        )
    return ModelReport(
        name,
        size,
        zoom,
        metrics.detection_rate(ims),
        frechet,
        real,
        prompt_sensitivity(pipe),
        round(time_sampling(pipe, 4, 25, cfg.guidance), 3),
        ims[:32],
    )


@dataclass
class BaseStudyResult:
    models: list  # ModelReport per model, in the order given


def run(models, cfg: BaseStudyConfig, should_stop=never):
    """The study as a job: progress events, then Done(BaseStudyResult)."""
    reports = []
    for m in models:
        rep = yield from evaluate_model(m, cfg, should_stop)
        if rep is None:
            yield Done(BaseStudyResult(reports), cancelled=True)
            return
        reports.append(rep)
    yield Done(BaseStudyResult(reports))


def grid(images, cols: int = 8) -> Image.Image:
    rows = [np.concatenate(images[i : i + cols], axis=1) for i in range(0, len(images) - cols + 1, cols)]
    return Image.fromarray(np.concatenate(rows, axis=0))


def to_markdown(doc: dict) -> str:
    reps = doc["models"]
    sources = list(reps[0]["frechet"])
    head = "| base model | px | face-detection rate | " + " | ".join(f"Frechet to {s} (real vs real)" for s in sources)
    lines = [
        f'# Base model quality (prompt "{CLASS_PROMPT}", {doc["config"]["steps"]} steps, guidance '
        f"{doc['config']['guidance']}, {doc['config']['n']} samples per model)",
        "",
        head + " | 4 images, 25 steps |",
        "|---" * (4 + len(sources)) + "|",
    ]
    for r in reps:
        cells = [f"{r['frechet'][s]:.4f} ({r['real'][s]['frechet_b_to_a']:.4f})" for s in sources]
        lines.append(
            f"| {r['model']} | {r['size']} | {r['detection_rate']:.3f} | "
            + " | ".join(cells)
            + f" | {r['seconds_4_images']:.2f} s |"
        )
    lines += [
        "",
        "Real faces: LFW set A = photos of victim identities, set B = photos of shadow identities; UTKFace set "
        "A / B = two halves of the held-out chips; the base models saw none of them. Each model is compared "
        "with the same photos aligned in its own crop geometry. Face detection on the real sets A: "
        + ", ".join(f"{s} {reps[0]['real'][s]['detection_rate_a']:.3f}" for s in sources)
        + ".",
        "",
        "Prompt sensitivity (relative change of the UNet's prediction when only the prompt changes; mean over "
        "t = 900, 500, 200; ~0 means the model ignores its prompt):",
        "",
    ]
    for r in reps:
        lines.append(f"- {r['model']}: " + ", ".join(f"{k} {v:.4f}" for k, v in r["prompt_sensitivity"].items()))
    lines += ["", f"Rebuild: `{doc['command']}`."]
    return "\n".join(lines) + "\n"


@dataclass
class Args(BaseStudyConfig):
    """Measure base models' quality on the same protocol (the first is the one the report is about)."""

    model: str | None = None  # the base model (default: the embedded base)
    compare: tuple[str, ...] = ()  # other base models measured in the same run (folders or hub ids)
    out: str = str(RESULTS)  # folder of eval_base.json / .md / base_samples.png


def main(argv=None):
    from dataclasses import asdict

    from core.cli import command_line, config_of, parse

    a = parse(Args, argv)
    cfg = config_of(a, BaseStudyConfig)
    t0 = time.time()
    reps = run_with_progress_bar(run([a.model, *a.compare], cfg)).models
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    grid(reps[0].grid).save(out / "base_samples.png")
    doc = dict(
        command=command_line("core.studies.base", argv),
        config=asdict(cfg),
        seconds=round(time.time() - t0),
        models=[{k: v for k, v in asdict(r).items() if k != "grid"} for r in reps],
    )
    (out / "eval_base.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = to_markdown(doc)
    (out / "eval_base.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
