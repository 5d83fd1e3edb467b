"""Quality report of a base model: ``python -m core.studies.base``.

Measures, for the class prompt:
- face-detection rate (dlib frontal detector, :func:`core.faces.recognition.has_face`) on ``--n`` samples,
  next to the same rate on as many real held-out crops (victim identities: never seen in training);
- Frechet distance between dlib descriptors of the samples and of real held-out faces (set A:
  victim identities), next to the same distance between set A and another set of real faces of
  different people (set B: shadow identities), for scale; neither set was seen in training;
- prompt sensitivity (:func:`prompt_sensitivity`): how much the UNet's noise prediction moves when
  only the prompt changes; a DreamBooth trigger can only bind a subject if this is well above 0;
- the wall time to sample 4 images at 64 px with 25 steps;
- a sample grid (the model's own faces, no real person) written beside the report.
Writes ``<out>/eval_base.json`` and ``eval_base.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core import RESULTS
from core.faces import aligned, data
from core.faces import recognition as faces
from core.faces import metrics
from core.model.pipeline import load_pipeline, sample_images, time_sampling
from core.model.prompts import APPEARANCE_WORDS, CLASS_PROMPT, appearance_caption, instance_prompt, trigger_words


def real_heldout(n: int, group: str = "victims", root=None) -> np.ndarray:
    """``n`` real crops of one identity group that the base model never saw (round-robin over
    its identities: every identity's 1st photo, then every 2nd photo, ...)."""
    groups = data.Split.load().paths(group, root)
    paths, k = [], 0
    while len(paths) < n and k < 20:
        paths += [ps[k] for ps in groups.values() if len(ps) > k]
        k += 1
    if len(paths) < n:
        raise ValueError(f"only {len(paths)} held-out photos in {group}, need {n}")
    return aligned.load_crops(paths[:n])


@torch.no_grad()
def prompt_sensitivity(pipe, n: int = 32, timesteps=(900, 500, 200), seed: int = 0) -> dict:
    """Relative change ||eps(prompt A) - eps(prompt B)|| / ||eps(prompt A)|| of the UNet's noise
    prediction on the same noisy latents, averaged over ``timesteps``, for three prompt pairs:
    two different appearance captions ("a photo of ida03 idb17 face" vs another pair of words),
    the class prompt vs an appearance caption, and the class prompt vs a fresh trigger's instance
    prompt (a reserved word pre-training never saw). A model that ignores its prompt gives ~0."""
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
    pairs = {"appearance A vs appearance B": (a, b), "class prompt vs appearance": (cls, a),
             "class prompt vs unseen trigger": (cls, trig)}
    out = {}
    for name, (e1, e2) in pairs.items():
        vals = []
        for t in timesteps:
            tt = torch.full((n,), t, device=pipe.device)
            p1, p2 = unet(x, tt, e1.to(unet.dtype)).sample.float(), unet(x, tt, e2.to(unet.dtype)).sample.float()
            vals.append(float((p1 - p2).norm() / p1.norm()))
        out[name] = float(np.mean(vals))
    return out


def grid(images, cols: int = 8) -> Image.Image:
    rows = [np.concatenate(images[i : i + cols], axis=1) for i in range(0, len(images) - cols + 1, cols)]
    return Image.fromarray(np.concatenate(rows, axis=0))


def sample_many(pipe, n, guidance, steps=25, batch=16, seed0=0):
    out = []
    for s in range(seed0, seed0 + n, batch):
        out += sample_images(pipe, CLASS_PROMPT, n=min(batch, seed0 + n - s), seed=s, steps=steps, guidance=guidance)
    return out


def evaluate(model=None, n=256, guidances=(1.0,), steps=25, root=None) -> dict:
    pipe = load_pipeline(model)
    real_a, real_b = real_heldout(n, "victims", root), real_heldout(n, "shadow", root)
    da, db = faces.describe(real_a), faces.describe(real_b)
    report = dict(
        model=str(model or "embedded"),
        prompt=CLASS_PROMPT,
        n_samples=n,
        steps=steps,
        real=dict(n=n, detection_rate=metrics.detection_rate(real_b), detection_rate_set_a=metrics.detection_rate(real_a),
                  frechet_real_vs_real=metrics.frechet_distance(db, da)),
        samples={},
    )
    for g in guidances:
        t0 = time.time()
        ims = sample_many(pipe, n, g, steps)
        report["samples"][str(g)] = dict(
            guidance=g,
            detection_rate=metrics.detection_rate(ims),
            frechet_to_real=metrics.frechet_distance(faces.describe(ims), da),
            seconds_for_all=round(time.time() - t0, 1),
        )
        report["samples"][str(g)]["_images"] = ims[:32]
    report["prompt_sensitivity"] = prompt_sensitivity(pipe)
    report["seconds_4_images_25_steps"] = {str(g): round(time_sampling(pipe, 4, 25, g), 3) for g in guidances}
    return report


def to_markdown(r: dict) -> str:
    lines = [
        f"# Base model quality ({r['model']}, prompt \"{r['prompt']}\", {r['steps']} steps)",
        "",
        "| images | guidance | face-detection rate | Frechet distance (dlib descriptors) to real set A | 4 images, 25 steps |",
        "|---|---|---|---|---|",
        f"| real crops, set B: other unseen people (n={r['real']['n']}) | - | {r['real']['detection_rate']:.3f} | {r['real']['frechet_real_vs_real']:.4f} (real vs real) | - |",
    ]
    for g, s in r["samples"].items():
        lines.append(
            f"| samples (n={r['n_samples']}) | {s['guidance']} | {s['detection_rate']:.3f} | {s['frechet_to_real']:.4f} | {r['seconds_4_images_25_steps'][g]:.2f} s |"
        )
    lines += ["", "Prompt sensitivity (relative change of the UNet's noise prediction when only the prompt changes; "
              "mean over t = 900, 500, 200; ~0 means the model ignores its prompt):", ""]
    lines += [f"- {k}: {v:.4f}" for k, v in r.get("prompt_sensitivity", {}).items()]
    lines += ["", f"Real set A: {r['real']['n']} photos of victim identities, set B: {r['real']['n']} photos of shadow identities "
              f"(`assets/split.json`; the base model saw neither). Face-detection rate on set A: {r['real']['detection_rate_set_a']:.3f}.",
              "Rebuild: `python -m core.studies.base`."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder or hub id (default: the embedded base)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--guidance", default="1.0", help="comma-separated guidance scales")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    r = evaluate(a.model, a.n, [float(g) for g in a.guidance.split(",")], a.steps, a.data)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(r["samples"].values()))
    grid(first["_images"]).save(out / "base_samples.png")
    for s in r["samples"].values():
        s.pop("_images")
    (out / "eval_base.json").write_text(json.dumps(r, indent=1) + "\n")
    md = to_markdown(r)
    (out / "eval_base.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
