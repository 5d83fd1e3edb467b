"""Any face photo -> the aligned RGB face crop every model of the project sees.

The same alignment serves a visitor's upload and every training or evaluation photo (LFW, UTKFace,
through :mod:`core.faces.aligned`), so the base model learns exactly the crops visitors feed it.

1. open safely: size checked from the header before decoding (decompression bombs), truncated
   or corrupt files refused, EXIF orientation applied, every mode (palette, alpha, CMYK, 16-bit,
   greyscale, animated: first frame) converted to 8-bit RGB;
2. find the largest frontal face with dlib's detector (on a copy at most ``DETECT_MAX_SIDE`` px);
3. its 5 dlib landmarks -> similarity transform onto ``assets/face_template.json`` (the mean
   landmarks of LFW photos, spread by ``TEMPLATE_ZOOM``; rebuilt by
   ``python -m core.faces.ingest --build-template``) -> one warp at the model's resolution
   (:func:`align_face`: antialiased, mirrored border where the crop leaves the photo).
Every refusal is a subclass of :class:`IngestError` whose message a visitor can act on.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from PIL import Image, ImageOps, UnidentifiedImageError

from core import ASSETS
from core.faces import data
from core.faces import recognition as faces
from core.faces.recognition import DETECT_MAX_SIDE, find_face  # noqa: F401  (here since the ingestion was written)

MAX_PIXELS = 30_000_000  # larger photos are refused before decoding
MAX_BYTES = 30 * 1024 * 1024
TEMPLATE_SIZE = 128  # the template's landmark coordinates are given in a 128 px square
TEMPLATE_FILE = ASSETS / "face_template.json"
# The crop shows the face 128/108 times larger than LFW's central 128 px box (as if that box were 108
# px): UTKFace chips are framed tighter than LFW, and with LFW's own framing 30 % of an aligned UTKFace
# crop fell outside the photo (11 % with this zoom, measured on 287 chips); dlib's verification on LFW
# pairs.txt (150 + 150) is no worse for it: 96.3 % on the tighter box vs 94.3 % on LFW's.
TEMPLATE_ZOOM = 1.185


class IngestError(ValueError):
    """A photo that cannot be used; ``str(err)`` is a sentence for the visitor."""


class NotAnImage(IngestError):
    pass


class CorruptImage(IngestError):
    pass


class TooManyPixels(IngestError):
    pass


class NoFaceFound(IngestError):
    pass


class DrawnFace(IngestError):
    pass


@dataclass(frozen=True)
class Ingested:
    """A usable photo: the 64 px training-like crop and where the face was in the original."""

    crop: np.ndarray  # uint8 size x size x 3 (the model's resolution: 128 for the embedded model)
    box: tuple[int, int, int, int]  # face rectangle (left, top, right, bottom) in the oriented photo
    n_faces: int
    inside: float = 1.0  # fraction of the crop that lies inside the photo (the rest is mirrored border)
    notes: tuple[str, ...] = ()  # what the visitor should check about this photo (several faces, ...)


# 1. open --------------------------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode (alpha composited on white; 16/32-bit scaled, not clipped)."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        a = a / (a.max() if a.max() > 1.0 else 1.0)
        return Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")


MAX_ASPECT = 12  # a photo of a face is never a strip longer than this many times its width
ORIENTATION = 0x0112  # the EXIF tag that says how to turn a photo upright
NO_FACE = (
    "No face was found in this photo; use a photo where one face, at least 100 pixels wide, looks "
    "roughly at the camera."
)


def _read_bytes(src) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        return bytes(src)
    if isinstance(src, (str, Path)):
        p = Path(src)
        if not p.is_file():
            raise NotAnImage(f"{p.name}: file not found.")
        if p.stat().st_size > MAX_BYTES:
            raise TooManyPixels(
                f"{p.name}: the file is larger than {MAX_BYTES // 2**20} MB; please upload a smaller photo."
            )
        return p.read_bytes()
    return src.read()


def _unreadable(e: Exception) -> IngestError:
    """The sentence for a file Pillow starts to read and then gives up on."""
    if "too large" in str(e).lower() and ("text" in str(e).lower() or "chunk" in str(e).lower()):
        # Pillow refuses PNG text / colour-profile chunks over ImageFile's limit (a decompression bomb guard)
        return CorruptImage(
            "This PNG carries more hidden text or colour-profile data (metadata) than a photo ever "
            "has, so it is not read; please save the photo again without it (for example export it "
            "as JPEG) and upload that."
        )
    return CorruptImage(
        "The image file is damaged or truncated (part of it is missing or unreadable); please "
        "upload the original photo again."
    )


def _check_shape(w: int, h: int) -> None:
    if w * h > MAX_PIXELS:
        raise TooManyPixels(
            f"The photo is {w}x{h} ({w * h / 1e6:.0f} megapixels); please upload one under {MAX_PIXELS // 1_000_000} "
            "megapixels."
        )
    if w < 16 or h < 16:
        raise NoFaceFound(
            f"The image is only {w}x{h} pixels; please upload a larger photo (the face at least 100 pixels wide)."
        )
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise NoFaceFound(
            f"The image is {w}x{h} pixels, a thin strip rather than a photo of a face; please upload "
            "a photo where the face fills a good part of the picture."
        )


def open_image(src, orient: bool = True) -> Image.Image:
    """Open a path, bytes or file object as an oriented 8-bit RGB PIL image (first frame), or raise
    IngestError. ``img.info`` keeps ``frames`` (frames or pages in the file) and ``orientation``
    (the EXIF orientation tag, applied unless ``orient`` is False)."""
    if isinstance(src, Image.Image):
        img = src
    else:
        raw = _read_bytes(src)
        if len(raw) == 0:
            raise NotAnImage("The file is empty (0 bytes); please upload a photo (JPEG, PNG, WebP ...).")
        if len(raw) > MAX_BYTES:
            raise TooManyPixels(f"The file is larger than {MAX_BYTES // 2**20} MB; please upload a smaller photo.")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)
                img = Image.open(io.BytesIO(raw))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise TooManyPixels("The photo has too many pixels; please upload one under 30 megapixels.") from None
        except UnidentifiedImageError:
            raise NotAnImage(not_an_image(raw)) from None
        except (OSError, SyntaxError, ValueError, struct.error) as e:
            raise _unreadable(e) from None
    _check_shape(*img.size)
    frames = getattr(img, "n_frames", 1)
    try:
        with warnings.catch_warnings():  # Pillow warns of a malformed EXIF block, which is ignored here
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            img.load()
            orientation = _orientation(img)
            if orient and orientation not in (None, 1):
                img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb(img)
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        raise _unreadable(e) from None
    if img.mode in ("RGBA", "LA", "PA", "P", "La", "RGBa") and _alpha_extrema(img) == (0, 0):
        raise NotAnImage(
            "The image is fully transparent: there is nothing to see in it; please upload a photo "
            "(JPEG, PNG, WebP ...)."
        )
    rgb.info.update(frames=frames, orientation=orientation)
    return rgb


def _orientation(img: Image.Image) -> int | None:
    try:
        value = img.getexif().get(ORIENTATION)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is ignored, like any viewer does
        return None
    return value if isinstance(value, int) and 1 <= value <= 8 else None


def _alpha_extrema(img: Image.Image):
    try:
        return img.convert("RGBA").getchannel("A").getextrema()
    except (OSError, ValueError):
        return None


# what an unreadable upload is, by its first bytes: (test, what it is, what to do instead)
_NOT_PHOTOS = (
    (
        lambda h: h.lstrip().lower().startswith((b"<!doctype html", b"<html")),
        "a web page (HTML), not a photo",
        'open the page, save the image itself (right-click, "Save image as") and upload that file',
    ),
    (lambda h: b"<svg" in h.lower(), "an SVG drawing (vector graphics), not a photo", "upload a photo as JPEG or PNG"),
    (
        lambda h: h[4:8] == b"ftyp" and h[8:12] in (b"heic", b"heix", b"heif", b"mif1", b"msf1", b"hevc"),
        "an HEIC/HEIF photo (the iPhone's default format), which this app cannot read",
        (
            "export it as JPEG (on an iPhone: Settings > Camera > Formats > Most Compatible, or share it as JPEG) and "
            "upload that"
        ),
    ),
    (lambda h: h[4:8] == b"ftyp", "a video, not a photo", "upload a still photo (JPEG, PNG, WebP ...)"),
    (lambda h: h.startswith(b"%PDF"), "a PDF document, not a photo", "upload the photo itself (JPEG, PNG, WebP ...)"),
    (
        lambda h: h.startswith(b"PK\x03\x04"),
        "a zip archive, not a photo",
        "unzip it and upload the photos inside one by one (JPEG, PNG, WebP ...)",
    ),
)


def not_an_image(raw: bytes) -> str:
    """The sentence for an upload Pillow cannot read: what it seems to be, and what to upload instead."""
    head = raw[:512]
    for test, what, todo in _NOT_PHOTOS:
        if test(head):
            return f"This file is {what}; {todo}."
    return "This file is not an image we can read; please upload a photo (JPEG, PNG, WebP ...)."


# 2.-3. face -> crop ---------------------------------------------------------------------------


def load_template(path: str | Path = TEMPLATE_FILE) -> np.ndarray:
    """Where the 5 dlib landmarks sit in an aligned crop, in ``TEMPLATE_SIZE`` px coordinates (5 x 2)."""
    return np.asarray(json.loads(Path(path).read_text())["landmarks_128"], dtype=np.float64)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src -> dst points
    (Umeyama 1991); returns the 2 x 3 matrix."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    scale = np.trace(np.diag(sig) @ e) / s.var(0).sum()
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]])


@dataclass(frozen=True)
class Aligned:
    """An aligned crop and which of its pixels come from the photo (False: mirrored padding)."""

    crop: np.ndarray  # uint8 size x size x 3
    inside: np.ndarray  # bool size x size

    @property
    def inside_fraction(self) -> float:
        return float(self.inside.mean())


def align_face(img: Image.Image, points: np.ndarray, template: np.ndarray, size: int = data.IMAGE_SIZE) -> Aligned:
    """Warp a photo so its 5 landmarks land on the template, at ``size`` px.

    1. A face much larger than the crop is first shrunk with an antialiasing filter (a bicubic
       warp straight from a 12-megapixel selfie to 128 px would alias).
    2. Where the crop reaches beyond the photo (a tightly framed selfie, a UTKFace chip), the photo
       is extended by mirroring its border instead of a flat grey: the model never has to learn grey
       bars, and ``inside`` says which pixels are real (the base model's loss ignores the rest).
    3. One bicubic affine warp.
    """
    m = similarity_transform(points, template * (size / TEMPLATE_SIZE))  # photo -> crop
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))  # crop px per photo px
    shrink = int(1 / (2 * scale)) if scale < 0.5 else 1
    if shrink > 1:
        img = img.reduce(shrink)
        m = m @ np.diag([shrink, shrink, 1.0])
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))  # crop -> photo
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    px = inv[:2] @ np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    w, h = img.size
    inside = ((px[0] >= 0) & (px[0] < w) & (px[1] >= 0) & (px[1] < h)).reshape(size, size)
    arr = np.asarray(img)
    over = max(0.0, -px.min(), (px[0] - w).max(), (px[1] - h).max())
    pad = min(int(np.ceil(over)) + 3, max(w, h))
    if not inside.all() and pad > 0:
        arr = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
        inv = np.array([[1, 0, pad], [0, 1, pad], [0, 0, 1]]) @ inv
    warped = Image.fromarray(arr).transform(
        (size, size), Image.AFFINE, inv[:2].flatten().tolist(), resample=Image.BICUBIC, fillcolor=(127, 127, 127)
    )
    return Aligned(np.asarray(warped), inside)


def align_crop(img: Image.Image, points: np.ndarray, template: np.ndarray, size: int = data.IMAGE_SIZE) -> np.ndarray:
    """The aligned crop alone (see :func:`align_face`)."""
    return align_face(img, points, template, size).crop


def ingest_face(src, template: np.ndarray | None = None, size: int = data.IMAGE_SIZE) -> Ingested:
    """One visitor photo -> :class:`Ingested` (``size`` px aligned face crop), or raise IngestError.

    Only the first frame (page) of an animation or multi-page file is read, and a refusal says so. A
    photo whose EXIF orientation tag turns an upright face sideways (a tag left behind by an editor)
    is read as stored. A drawn face (:func:`core.faces.drawn.looks_drawn`) is refused. Of several
    faces the largest is used, and a note says so (the crop shows which)."""
    if not isinstance(src, Image.Image):
        src = _read_bytes(src)  # read once: it may be opened twice
    img = open_image(src)
    rect, pts, n = find_face(img)
    notes = []
    if rect is None and img.info.get("orientation") not in (None, 1):
        stored = open_image(src, orient=False)
        rect, pts, n = find_face(stored)
        if rect is not None:
            img = stored
            notes.append(
                "its orientation tag (EXIF) says to turn it, but the face is upright as stored, so it "
                "was used as stored."
            )
    if rect is None:
        if img.info.get("frames", 1) > 1:
            raise NoFaceFound(
                f"No face was found in the first frame of this file ({img.info['frames']} frames or "
                "pages): only the first frame is read. Save the frame with the face as a photo of its "
                "own (JPEG or PNG) and upload that."
            )
        raise NoFaceFound(NO_FACE)
    from core.faces.drawn import DRAWN_MESSAGE, looks_drawn

    if looks_drawn(img, rect):
        raise DrawnFace(DRAWN_MESSAGE)
    if n > 1:
        notes.append(
            f"{n} faces were found and the largest was used (see its crop); if that is not the right "
            "person, upload a photo of them alone."
        )
    al = align_face(img, pts, load_template() if template is None else template, size)
    return Ingested(
        al.crop, (rect.left(), rect.top(), rect.right(), rect.bottom()), n, al.inside_fraction, tuple(notes)
    )


# template -------------------------------------------------------------------------------------


def build_template(root=None, n: int = 600, seed: int = 0, zoom: float = TEMPLATE_ZOOM) -> dict:
    """Mean dlib 5-point landmarks over ``n`` pretrain LFW images (in their central 128 px box),
    spread about the box centre by ``zoom``: the crop shows the face ``zoom`` times larger than
    LFW's central box (see ``TEMPLATE_ZOOM``)."""
    import random

    split = data.Split.load()
    paths = [p for ps in split.paths("pretrain", root).values() for p in ps]
    random.Random(seed).shuffle(paths)
    pts, used = [], 0
    for p in paths:
        if used >= n:
            break
        arr = np.asarray(Image.open(p).convert("RGB"))
        rects = faces.detect(arr, 0)
        if len(rects) != 1:
            continue
        pts.append(faces.landmarks5(arr, rects[0]) - [61, 61])  # into LFW's central 128 px box
        used += 1
    pts = np.stack(pts)
    c = TEMPLATE_SIZE / 2
    return dict(
        landmarks_128=((pts.mean(0) - c) * zoom + c).round(3).tolist(),
        std_128=(pts.std(0) * zoom).round(3).tolist(),
        zoom=zoom,
        n_images=used,
        source="LFW deep-funneled pretrain identities (assets/split.json), one face detected; mean landmarks "
        "in the central 128 px box, spread about its centre by `zoom`",
        command=f"python -m core.faces.ingest --build-template --zoom {zoom}",
    )


@dataclass
class IngestArgs:
    """Align photos into face crops as the app does, or rebuild the face template."""

    photos: tyro.conf.Positional[tuple[str, ...]] = ()  # photo files to align
    out: str = "."  # folder for the crops
    size: int = data.IMAGE_SIZE  # crop size in px (the model's resolution)
    build_template: bool = False  # rebuild assets/face_template.json from LFW instead
    zoom: float = TEMPLATE_ZOOM  # with --build-template: face size relative to LFW's central 128 px box
    data: str | None = None  # LFW folder for --build-template (default $LEAKLAB_LFW or ../shared/data/lfw-deepfunneled)


def main(argv=None):
    from core.cli import parse

    a = parse(IngestArgs, argv)
    if a.build_template:
        t = build_template(a.data, zoom=a.zoom)
        TEMPLATE_FILE.write_text(json.dumps(t, indent=1) + "\n")
        print(f"template from {t['n_images']} images -> {TEMPLATE_FILE}")
    for p in a.photos:
        try:
            r = ingest_face(p, size=a.size)
            out = Path(a.out) / (Path(p).stem + "_crop.png")
            Image.fromarray(r.crop).save(out)
            print(f"{p}: face {r.box} ({r.n_faces} found) -> {out}")
        except IngestError as e:
            print(f"{p}: {e}")


if __name__ == "__main__":
    main()
