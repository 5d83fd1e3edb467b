"""Example photos for the app, made by the project itself: ``python -m core.model.examples``.

No photo of a real person ships with the project. An example "person" is a face the embedded
base model draws from the class prompt, plus variations of it (img2img from that face at a low
strength, different seeds, some mirrored), kept only if dlib finds a face in every one and every
variation is within 0.6 of the original (dlib's same-person threshold). Saved as 128 px PNGs
under ``assets/examples/<name>/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from core import ASSETS
from core.events import Done, Message, Progress, never, run_with_progress_bar
from core.faces import metrics
from core.faces import recognition as faces
from core.model.pipeline import load_pipeline, sample_images
from core.model.prompts import CLASS_PROMPT

OUT = ASSETS / "examples"


@torch.no_grad()
def variations(pipe, face: np.ndarray, n: int, strength: float, seed: int) -> list[np.ndarray]:
    from diffusers import StableDiffusionImg2ImgPipeline

    i2i = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    i2i.set_progress_bar_config(disable=True)
    out = []
    for k in range(n):
        g = torch.Generator().manual_seed(seed + k)
        src = face[:, ::-1] if k % 2 else face
        im = i2i(
            CLASS_PROMPT,
            image=Image.fromarray(np.ascontiguousarray(src)),
            strength=strength,
            num_inference_steps=25,
            guidance_scale=1.0,
            generator=g,
            output_type="np",
        ).images[0]
        out.append((np.clip(im, 0, 1) * 255).round().astype(np.uint8))
    return out


def make_person(pipe, seed: int, n: int = 6, strength: float = 0.45):
    face = sample_images(pipe, CLASS_PROMPT, seed=[seed], steps=25)[0]
    if not faces.has_face(face):
        return None
    vs = variations(pipe, face, n - 1, strength, seed * 100)
    ims = [face] + vs
    d = metrics.distance(faces.describe(ims), faces.describe([face]))
    if not all(faces.has_face(v) for v in vs) or d.max() >= metrics.SAME_PERSON:
        return None
    return ims, d


@dataclass
class Args:
    """Draw the app's example "people" with the embedded base model (nobody real)."""

    people: int = 2  # example people to make
    photos: int = 6  # photos per person
    first_seed: int = 1000  # base-model seed of the first candidate face (candidates are tried in order)
    model: str | None = None  # base model folder (default: the embedded base)


MAX_CANDIDATES = 200  # candidate faces tried at most (seeds first_seed .. first_seed + 199)


def save_person(folder, ims, seed: int, d) -> None:
    folder.mkdir(exist_ok=True)
    for i, im in enumerate(ims):
        Image.fromarray(im).save(folder / f"{i:02d}.png", optimize=True)
    (folder / "about.json").write_text(
        json.dumps(
            dict(
                made_by="python -m core.model.examples",
                base_seed=seed,
                photos=len(ims),
                dlib_distance_to_first=[round(float(x), 3) for x in d],
                note="drawn by the embedded base model: not a real person",
            ),
            indent=1,
        )
        + "\n"
    )


def make_examples(pipe, a: Args, out=OUT, should_stop=never):
    """Job: try candidate faces in seed order until ``a.people`` example people are saved under ``out``
    (a Progress per candidate, a Message per person); Done(their folders) (on a stop: those saved so far,
    cancelled)."""
    out.mkdir(parents=True, exist_ok=True)
    made, stopped, t0 = [], False, time.perf_counter()
    for k in range(MAX_CANDIDATES):
        if len(made) >= a.people:
            break
        if should_stop():
            stopped = True
            break
        seed = a.first_seed + k
        got = make_person(pipe, seed, a.photos)
        if got:
            ims, d = got
            folder = out / f"person_{seed}"
            save_person(folder, ims, seed, d)
            made.append(folder)
            yield Message(f"{folder}: {len(ims)} photos, max distance to the first {d.max():.3f}")
        yield Progress("candidate faces", k + 1, MAX_CANDIDATES, time.perf_counter() - t0, {"people": len(made)})
    yield Done(made, cancelled=stopped)


def main(argv=None):
    from core.cli import parse

    a = parse(Args, argv)
    run_with_progress_bar(make_examples(load_pipeline(a.model), a))


if __name__ == "__main__":
    main()
