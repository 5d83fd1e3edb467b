"""Is this face drawn? A cartoon is refused before it becomes a training photo.

dlib's detector finds faces in drawings too: a cartoon of a face (flat colour fills, dark outlines)
is detected about as often as the photo it was drawn from (measured below), so a visitor's smiley or
comic avatar would be fine-tuned on as if it were them. A drawing differs from a photo in what lies
*between* its edges: a photo's skin carries shading and sensor noise everywhere, a drawing's fills
are flat. Three measures of the face box (the dlib rectangle, shrunk to at most 128 px wide by
pixel averaging, so every photo size is judged alike), each written for JPEG too (its ringing
would hide flat fills from a naive count):

- ``flat``: share of pixels whose 3x3 neighbourhood, after a 3x3 median (which removes JPEG
  ringing), varies by at most 2 levels in every channel;
- ``shading``: share of pixels with a gentle luminance gradient (1.5 to 6 levels per pixel): the
  shading of skin, which flat fills lack;
- ``palette``: share of pixels covered by the 8 most common colours at 16 levels per channel.

Why these and not a classifier: a trained drawing detector would need a labelled data set of
drawings this project does not have (and may not download); these measures need none, are cheap
(a few ms per photo) and can be checked by anyone. The thresholds (:data:`RULE`) were picked on the
measurement below so that no photo of the measured sets is refused.

Measured by ``python -m core.faces.drawn --n 250`` (writes ``docs/results/drawn_faces.{json,md}``):
photos of LFW and UTKFace (as stored, re-compressed, upscaled) and the base model's example faces,
against cartoons made from the same photos (flat colours, posterised levels, outlines; PNG and JPEG),
plus 2000 more UTKFace photos (stored and JPEG q40) to count false refusals. What it found: no photo
refused; every PNG drawing refused; JPEG drawings refused when large (75-90 %), rarely when small
and compressed (their flat fills drown in JPEG noise at 100 px): a limit, stated in the report.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from core import RESULTS

BOX_WIDTH = 128  # the face box is shrunk to at most this width before it is measured
# drawn when few colours cover the face and its fills are flat or lack shading (python -m core.faces.drawn):
# flat alone is not enough (a baby's smooth skin in a JPEG reaches 0.41), few colours alone neither
# (a greyscale photo reaches 0.99)
RULE = dict(palette=0.80, flat=0.35, shading=0.25)
DRAWN_MESSAGE = (
    "This face looks drawn (a cartoon, a drawing or a heavily filtered picture: flat colours without "
    "the shading of skin); the app learns a real face, so please upload a photo of a real face."
)


@dataclass(frozen=True)
class Drawnness:
    flat: float
    shading: float
    palette: float

    @property
    def drawn(self) -> bool:
        return self.palette >= RULE["palette"] and (self.flat >= RULE["flat"] or self.shading <= RULE["shading"])


def face_box(img: Image.Image, rect) -> np.ndarray:
    """The dlib rectangle's pixels (clipped to the photo), averaged down to at most BOX_WIDTH wide."""
    l, t = max(0, rect.left()), max(0, rect.top())
    r, b = min(img.width, rect.right()), min(img.height, rect.bottom())
    box = img.crop((l, t, max(r, l + 1), max(b, t + 1)))
    k = box.width // BOX_WIDTH
    if k > 1:
        box = box.reduce(k)
    return np.asarray(box.convert("RGB")).astype(np.int16)


def measure(img: Image.Image, rect) -> Drawnness:
    """The three measures of the face in ``rect`` (see the module docstring)."""
    from scipy.ndimage import maximum_filter, median_filter, minimum_filter, sobel

    a = face_box(img, rect)
    if min(a.shape[:2]) < 8:
        return Drawnness(0.0, 1.0, 0.0)
    m = median_filter(a, size=(3, 3, 1))
    spread = (maximum_filter(m, size=(3, 3, 1)) - minimum_filter(m, size=(3, 3, 1))).max(-1)[1:-1, 1:-1]
    y = a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    g = (np.hypot(sobel(y, 0), sobel(y, 1)) / 8)[1:-1, 1:-1]
    q = a // 16
    counts = np.sort(np.bincount((q[..., 0] * 256 + q[..., 1] * 16 + q[..., 2]).ravel()))[::-1]
    return Drawnness(
        flat=float((spread <= 2).mean()),
        shading=float(((g >= 1.5) & (g < 6)).mean()),
        palette=float(counts[:8].sum() / q[..., 0].size),
    )


def looks_drawn(img: Image.Image, rect) -> bool:
    return measure(img, rect).drawn


# the measurement ---------------------------------------------------------------------------------


def cartoon(img: Image.Image, style: str) -> Image.Image:
    """A drawing made from a photo: "flat" (smoothed, 8 colours), "levels" (posterised, 4 levels per
    channel) or "outlined" (6 colours with dark outlines, as a comic)."""
    if style == "levels":
        a = np.asarray(img.filter(ImageFilter.MedianFilter(7))).astype(int)
        return Image.fromarray((a // 64 * 64 + 32).clip(0, 255).astype(np.uint8))
    flat = (
        img.filter(ImageFilter.MedianFilter(5))
        .quantize(8 if style == "flat" else 6, method=Image.Quantize.MEDIANCUT)
        .convert("RGB")
    )
    if style == "flat":
        return flat
    edges = img.convert("L").filter(ImageFilter.FIND_EDGES).point(lambda v: 0 if v > 40 else 255)
    return Image.composite(flat, Image.new("RGB", img.size, (20, 20, 20)), edges.filter(ImageFilter.MinFilter(3)))


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def variants(img: Image.Image, source: str):
    """(set name, image) pairs measured for one source photo."""
    big = img.resize((img.width * 3, img.height * 3), Image.BICUBIC)
    yield f"photo {source}", img
    yield f"photo {source}, JPEG q40", jpeg(img, 40)
    yield f"photo {source}, upscaled 3x", big
    yield f"photo {source}, upscaled 3x, JPEG q60", jpeg(big, 60)
    for style in ("flat", "levels", "outlined"):
        toon = cartoon(img, style)
        yield f"drawn {style} ({source}), PNG", toon
        yield f"drawn {style} ({source}), JPEG q85", jpeg(toon, 85)
        yield f"drawn {style} ({source}), JPEG q70", jpeg(toon, 70)
    yield f"drawn flat ({source}, upscaled 3x), PNG", cartoon(big, "flat")
    yield f"drawn flat ({source}, upscaled 3x), JPEG q85", jpeg(cartoon(big, "flat"), 85)


def sources(n: int, seed: int = 0):
    """(source name, PIL image): n LFW photos, n UTKFace photos, every bundled example face (each
    measured as a photo and as drawings made from it)."""
    from core import ASSETS
    from core.faces import data

    rnd = random.Random(seed)
    split = data.Split.load()
    lfw = [p for ps in split.paths("pretrain", None).values() for p in ps]
    utk = list(data.utkface_files())
    rnd.shuffle(lfw)
    rnd.shuffle(utk)
    for p in lfw[:n]:
        yield "LFW", Image.open(p).convert("RGB")
    for p in utk[:n]:
        yield "UTKFace", Image.open(p).convert("RGB")
    for p in sorted((ASSETS / "examples").glob("*/*.png")):
        yield "example face", Image.open(p).convert("RGB").resize((256, 256), Image.BICUBIC)


def more_photos(n: int, skip: int, seed: int = 0):
    """(set name, image): n more UTKFace photos (after the first ``skip`` of the same shuffle), as
    stored and re-compressed: UTKFace holds the hardest photos for this rule (babies' smooth skin,
    greyscale scans), so the rule's false refusals are counted on many of them."""
    from core.faces import data

    utk = list(data.utkface_files())
    random.Random(seed).shuffle(utk)
    for p in utk[skip : skip + n]:
        img = Image.open(p).convert("RGB")
        yield "photo UTKFace (more)", img
        yield "photo UTKFace (more), JPEG q40", jpeg(img, 40)


def run(n: int, n_more: int = 2000) -> dict:
    from itertools import chain

    from core.faces.recognition import find_face

    sets: dict[str, dict] = {}
    pairs = chain((pair for source, img in sources(n) for pair in variants(img, source)), more_photos(n_more, n))
    for name, v in pairs:
        s = sets.setdefault(name, dict(images=0, detected=0, refused=0, values=[]))
        s["images"] += 1
        rect, _, _ = find_face(v)
        if rect is None:
            continue
        d = measure(v, rect)
        s["detected"] += 1
        s["refused"] += int(d.drawn)
        s["values"].append([d.flat, d.shading, d.palette])
    for s in sets.values():
        vals = np.array(s.pop("values") or [[np.nan] * 3])
        s.update(
            {
                k: [float(np.nanmin(vals[:, i])), float(np.nanmedian(vals[:, i])), float(np.nanmax(vals[:, i]))]
                for i, k in enumerate(("flat", "shading", "palette"))
            }
        )
    return dict(
        n=n, n_more=n_more, rule=RULE, command=f"python -m core.faces.drawn --n {n} --n-more {n_more}", sets=sets
    )


def report_markdown(r: dict) -> str:
    lines = [
        f"# Drawn faces: what the ingestion refuses (`{r['command']}`)",
        "",
        f"Rule: drawn when palette >= {r['rule']['palette']} and (flat >= {r['rule']['flat']} or shading <= "
        f"{r['rule']['shading']}) (core/faces/drawn.py). *Detected*: images in which dlib's detector finds a face; "
        "*refused*: of those, the share the rule calls drawn. Values: min / median / max over the detected.",
        "",
        "| set | images | face detected | refused as drawn | flat | shading | palette |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in r["sets"].items():
        share = f"{s['refused'] / s['detected']:.1%}" if s["detected"] else "-"
        lines.append(
            f"| {name} | {s['images']} | {s['detected']} | {s['refused']} ({share}) | "
            + " | ".join(" / ".join(f"{x:.2f}" for x in s[k]) for k in ("flat", "shading", "palette"))
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description="Measure the drawn-face rule on photos and on cartoons made from them")
    ap.add_argument("--n", type=int, default=250, help="LFW and UTKFace photos each (as photos and as drawings)")
    ap.add_argument("--n-more", type=int, default=2000, help="more UTKFace photos, measured as photos only")
    ap.add_argument("--out", default=str(RESULTS / "drawn_faces"), help="output path without extension")
    a = ap.parse_args(argv)
    r = run(a.n, a.n_more)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(r, indent=1) + "\n")
    Path(a.out + ".md").write_text(report_markdown(r))
    print(report_markdown(r))


if __name__ == "__main__":
    main()
