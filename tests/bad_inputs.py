"""The bad-input corpus: files a visitor might upload that the app must refuse (or quietly fix) with a
clear message, generated at test time in a temp folder (no binary file is committed).

Photos are made from the example faces the project drew with its own base model (``assets/examples``,
nobody real) or drawn here with PIL; LoRA files are random LoRAs for the app's base model, broken in
one way each. Every case says where it is uploaded (``kind``), what the app must say (``expect``: words
of its message, case-insensitive) and how many photos stay usable.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import struct
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from core import ASSETS

EXAMPLE_FACES = sorted((ASSETS / "examples").glob("*/*.png"))


@dataclass(frozen=True)
class BadInput:
    name: str
    # "photo": one upload to the Fine-tune tab; "photos": a set of them; "lora": a file the Attack tab
    # refuses; "lora-ok": one it attacks; "oversize": a file Gradio refuses while it streams in;
    # "train" / "sample": the settings of the Train / Draw faces buttons (make returns the values)
    kind: str
    make: Callable  # make(folder, pipe) -> list of paths it wrote (the values, for train / sample)
    expect: tuple[str, ...]  # words the visitor's message must contain
    usable: int = 0  # photos the app keeps from this upload


# helpers ----------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (no real pixel data): size must be refused unread."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def face(i: int = 0, size: int = 256) -> Image.Image:
    """Example face ``i`` (drawn by the base model) on a photo-sized canvas."""
    return Image.open(EXAMPLE_FACES[i % len(EXAMPLE_FACES)]).convert("RGB").resize((size, size), Image.BICUBIC)


def write(folder: Path, name: str, data: bytes) -> list[Path]:
    path = Path(folder) / name
    path.write_bytes(data)
    return [path]


def private_photos(folder: Path, person: int = 0, n: int = 3, tag: str = "") -> list[Path]:
    """``n`` example faces of example person ``person``, each saved with a unique name and unique bytes: a
    visitor's own photos (two visitors never upload the same file)."""
    from PIL import PngImagePlugin

    people = sorted({p.parent for p in EXAMPLE_FACES})
    out = []
    for i, p in enumerate(sorted(people[person % len(people)].glob("*.png"))[:n]):
        info = PngImagePlugin.PngInfo()
        info.add_text("note", f"{tag}-{i}-{time.time_ns()}")
        out += write(
            folder, f"private-{tag}-{i}-{os.getpid()}.png", encode(Image.open(p).convert("RGB"), "PNG", pnginfo=info)
        )
    return out


def cartoon() -> Image.Image:
    """A smiley drawn with PIL: a face to a person, not to a face detector."""
    img = Image.new("RGB", (256, 256), (250, 240, 200))
    d = ImageDraw.Draw(img)
    d.ellipse((48, 40, 208, 216), fill=(255, 205, 120), outline=(0, 0, 0), width=4)
    d.ellipse((88, 95, 108, 120), fill=(0, 0, 0))
    d.ellipse((148, 95, 168, 120), fill=(0, 0, 0))
    d.arc((88, 120, 168, 185), 20, 160, fill=(0, 0, 0), width=5)
    return img


def landscape() -> Image.Image:
    """Sky, sun, hills and a tree drawn with PIL: a photo with no face."""
    img = Image.new("RGB", (320, 240), (135, 190, 235))
    d = ImageDraw.Draw(img)
    d.ellipse((240, 20, 290, 70), fill=(255, 220, 60))
    d.polygon([(0, 170), (90, 110), (180, 160), (260, 100), (320, 150), (320, 240), (0, 240)], fill=(70, 140, 60))
    d.rectangle((60, 140, 72, 200), fill=(100, 60, 30))
    d.ellipse((35, 95, 97, 150), fill=(40, 110, 40))
    return img


def exif_rotated() -> bytes:
    """A face stored sideways with the EXIF tag that says how to turn it upright (as phones save photos)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return encode(face(1).transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


def random_lora(pipe, rank: int = 4, alpha: float = 2.0, text_encoder: bool = True, seed: int = 0):
    """A :class:`core.finetune.lora.FinetuneResult` holding a random (untrained) LoRA for ``pipe``'s base model,
    made from peft adapters exactly as a fine-tune makes them."""
    from core.finetune.lora import TEXT_TARGETS, FinetuneConfig, FinetuneResult, lora_config, lora_state_dict
    from core.model.prior import base_fingerprint

    cfg = FinetuneConfig(rank=rank, alpha=alpha, text_encoder=text_encoder)
    torch.manual_seed(seed)
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(lora_config(cfg))
    te = None
    if text_encoder:
        te = copy.deepcopy(pipe.text_encoder)
        te.add_adapter(lora_config(cfg, TEXT_TARGETS))
    lora = {k: torch.randn_like(v) * 0.1 for k, v in lora_state_dict(unet, te).items()}
    return FinetuneResult(lora, "trigger", cfg, base_fingerprint(pipe), steps_done=1)


def lora_file(folder: Path, pipe, name: str, edit: Callable | None = None) -> list[Path]:
    """A valid LoRA file for ``pipe`` written by the app's own exporter, then changed by ``edit(tensors, meta)``."""
    from safetensors import safe_open

    from core.finetune.lora import save_lora

    path = save_lora(Path(folder) / name, random_lora(pipe, text_encoder=False))
    if edit is not None:
        with safe_open(str(path), "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        edit(tensors, meta)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return [path]


def _first(tensors, suffix="lora_A.weight"):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _wrong_shape(t, meta):
    k = _first(t)
    t[k] = torch.zeros(t[k].shape[0], t[k].shape[1] + 3, *t[k].shape[2:])


def _nan(t, meta):
    k = _first(t, "lora_B.weight")
    t[k][0].fill_(float("nan"))


def _other_base(t, meta):
    meta["leaklab_base_fingerprint"] = "0123456789abcdef"
    meta["leaklab_base_model"] = "runwayml/stable-diffusion-v1-5"


def _int_weights(t, meta):
    k = _first(t)
    t[k] = t[k].to(torch.int32)


def _drop_b(t, meta):
    del t[_first(t, "lora_B.weight")]


def _loha(t, meta):
    """A LyCORIS LoHa under kohya names (hada_w1_a ...): another adapter kind than LoRA."""
    for k in [k for k in t if k.endswith("lora_A.weight")]:
        name = k.replace("unet.", "lora_unet_", 1).removesuffix(".lora_A.weight").replace(".", "_")
        a, b = t.pop(k), t.pop(k.replace("lora_A", "lora_B"))
        t.update(
            {
                f"{name}.hada_w1_a": b.flatten(1),
                f"{name}.hada_w1_b": a.flatten(1),
                f"{name}.hada_w2_a": b.flatten(1).clone(),
                f"{name}.hada_w2_b": a.flatten(1).clone(),
                f"{name}.alpha": torch.tensor(4.0),
            }
        )


def _dora(t, meta):
    """A DoRA in diffusers / peft naming: a magnitude vector beside every A and B."""
    for k in [k for k in t if k.endswith("lora_B.weight")]:
        t[k.replace("lora_B.weight", "lora_magnitude_vector")] = torch.ones(t[k].shape[0])


def unet_weights(folder: Path, pipe) -> list[Path]:
    """A safetensors file of full UNet weights (a checkpoint, not a LoRA)."""
    sd = {f"unet.{k}": v.detach().float().contiguous() for k, v in list(pipe.unet.state_dict().items())[:20]}
    path = Path(folder) / "model.safetensors"
    save_file(sd, str(path))
    return [path]


def huge_tensor(folder: Path, pipe) -> list[Path]:
    """A real safetensors file with one 68 MB tensor (over the 64 MB limit: refused by Gradio's
    max_file_size while it streams in, before the app sees it)."""
    path = Path(folder) / "huge.safetensors"
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(17_000_000)}, str(path))
    return [path]


def bad_header(folder: Path, pipe) -> list[Path]:
    """A safetensors-shaped file whose JSON header is broken."""
    head = b'{"unet.conv_in.lora_A.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]'  # no closing }
    return write(folder, "bad_header.safetensors", struct.pack("<Q", len(head)) + head + b"\0" * 64)


def torch_zip(folder: Path, pipe) -> list[Path]:
    """What ``torch.save`` writes (a zip with a pickle inside), renamed .safetensors; written with zipfile,
    so nothing here pickles tensors."""
    path = Path(folder) / "lora.safetensors"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"unet.conv_in.lora_A.weight": [0.0] * 16}))
        z.writestr("archive/version", "3\n")
    return [path]


def many_photos(n: int) -> Callable:
    def make(folder: Path, pipe) -> list[Path]:
        out = []
        for i in range(n):  # the example faces, each a little different (mirrored, resized, re-encoded)
            img = face(i, size=160 + 8 * (i // len(EXAMPLE_FACES)))
            if (i // len(EXAMPLE_FACES)) % 2:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out += write(folder, f"photo_{i:02d}.jpg", encode(img, quality=90))
        return out

    return make


def _photo(name: str, data: Callable[[], bytes]) -> Callable:
    return lambda folder, pipe: write(folder, name, data())


# the corpus -------------------------------------------------------------------------------------

NO_FACE = ("no face was found", "looks roughly at the camera")

CASES = [
    # photos for the Fine-tune tab, one at a time
    BadInput(
        "text-file-as-photo",
        "photo",
        _photo("notes.jpg", lambda: b"shopping list: eggs, milk\n" * 40),
        ("not an image", "jpeg, png"),
    ),
    BadInput("empty-file", "photo", _photo("empty.jpg", lambda: b""), ("empty (0 bytes)", "upload a photo")),
    BadInput(
        "truncated-jpeg",
        "photo",
        _photo("cut.jpg", lambda: encode(face(0))[:1500]),
        ("damaged or truncated", "original photo again"),
    ),
    BadInput(
        "40-megapixels",
        "photo",
        _photo("huge.jpg", lambda: encode(Image.new("RGB", (8000, 5000), (90, 120, 150)), quality=30)),
        ("40 megapixels", "under 30 megapixels"),
    ),
    BadInput(
        "decompression-bomb",
        "photo",
        _photo("bomb.png", lambda: png_header_only(30000, 30000)),
        ("too many pixels", "under 30 megapixels"),
    ),
    BadInput(
        "over-30-mb",
        "photo",
        _photo("big.jpg", lambda: b"\xff\xd8\xff\xe0" + bytes(31 * 2**20)),
        ("larger than 30 mb", "smaller photo"),
    ),
    BadInput(
        "tiny-image",
        "photo",
        _photo("icon.png", lambda: encode(Image.new("RGB", (8, 8)), "PNG")),
        ("only 8x8 pixels", "larger photo"),
    ),
    BadInput(
        "html-renamed-jpg",
        "photo",
        _photo("page.jpg", lambda: b"<!DOCTYPE html><html><body><img src='me.jpg'></body></html>"),
        ("web page", "save the image itself"),
    ),
    BadInput(
        "svg-drawing",
        "photo",
        _photo(
            "face.svg",
            lambda: (
                b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/'
                b'2000/svg" width="64" height="64"><circle cx="32" '
                b'cy="32" r="20"/></svg>'
            ),
        ),
        ("svg", "drawing", "jpeg or png"),
    ),
    BadInput(
        "heic-from-a-phone",
        "photo",
        _photo("IMG_0001.HEIC", lambda: b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(200)),
        ("heic/heif photo", "export it as jpeg"),
    ),
    BadInput(
        "video-clip",
        "photo",
        _photo("clip.mp4", lambda: b"\0\0\0\x20ftypisom\0\0\x02\0isomiso2mp41" + bytes(100)),
        ("a video", "still photo"),
    ),
    BadInput(
        "pdf-document",
        "photo",
        _photo("scan.pdf", lambda: b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer\n%%EOF\n"),
        ("pdf document", "the photo itself"),
    ),
    BadInput(
        "zip-renamed-jpg", "photo", _photo("photos.jpg", lambda: b"PK\x03\x04" + bytes(100)), ("zip archive", "unzip")
    ),
    BadInput(
        "random-noise",
        "photo",
        _photo(
            "noise.png",
            lambda: encode(
                Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)), "PNG"
            ),
        ),
        NO_FACE,
    ),
    BadInput("landscape", "photo", _photo("holiday.jpg", lambda: encode(landscape())), NO_FACE),
    BadInput("cartoon-face", "photo", _photo("smiley.png", lambda: encode(cartoon(), "PNG")), NO_FACE),
    BadInput("upside-down-face", "photo", _photo("upside.jpg", lambda: encode(face(2).rotate(180))), NO_FACE),
    # unusual but usable photos: converted, and kept
    BadInput(
        "cmyk-jpeg", "photo", _photo("print.jpg", lambda: encode(face(3).convert("CMYK"))), ("1 usable photo",), 1
    ),
    BadInput(
        "16-bit-png",
        "photo",
        _photo("deep.png", lambda: encode(Image.fromarray(np.asarray(face(4).convert("L"), np.uint16) * 257), "PNG")),
        ("1 usable photo",),
        1,
    ),
    BadInput(
        "animated-gif",
        "photo",
        _photo("anim.gif", lambda: encode(face(5), "GIF", save_all=True, append_images=[face(6)], duration=200)),
        ("1 usable photo",),
        1,
    ),
    BadInput("exif-rotated", "photo", _photo("phone.jpg", exif_rotated), ("1 usable photo",), 1),
    BadInput(
        "transparent-png",
        "photo",
        _photo("cutout.png", lambda: encode(face(7).convert("RGBA"), "PNG")),
        ("1 usable photo",),
        1,
    ),
    # photo sets
    BadInput("one-photo", "photos", many_photos(1), ("1 usable photo", "at least 3"), 1),
    BadInput("fifty-photos", "photos", many_photos(50), ("50 usable photos", "only the first 10"), 50),
    # LoRA files for the Attack tab
    BadInput(
        "pickle-ckpt",
        "lora",
        lambda folder, pipe: write(folder, "lora.ckpt", pickle.dumps({"state_dict": {}})),
        ("python pickle", "arbitrary code", "convert it to .safetensors"),
    ),
    BadInput("torch-zip-renamed", "lora", torch_zip, ("zip archive", "arbitrary code")),
    BadInput("empty-lora", "lora", lambda folder, pipe: write(folder, "empty.safetensors", b""), ("empty (0 bytes)",)),
    BadInput(
        "random-bytes",
        "lora",
        lambda folder, pipe: write(
            folder, "noise.safetensors", np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        ),
        ("not a readable .safetensors file",),
    ),
    BadInput(
        "photo-renamed-lora",
        "lora",
        lambda folder, pipe: write(folder, "me.safetensors", encode(face(0))),
        ("not a readable .safetensors file",),
    ),
    BadInput("broken-header", "lora", bad_header, ("header is not valid json",)),
    BadInput("huge-tensor", "oversize", huge_tensor, ("maximum allowed size", str(64 * 2**20))),
    BadInput(
        "wrong-shapes",
        "lora",
        lambda folder, pipe: lora_file(folder, pipe, "shapes.safetensors", _wrong_shape),
        ("has shape", "does not fit this model"),
    ),
    BadInput(
        "nan-weights",
        "lora",
        lambda folder, pipe: lora_file(folder, pipe, "nan.safetensors", _nan),
        ("nan or infinite",),
    ),
    BadInput(
        "other-base-model",
        "lora",
        lambda folder, pipe: lora_file(folder, pipe, "sd15.safetensors", _other_base),
        ("different base model", "stable-diffusion-v1-5", "fine-tuned from this app's base model"),
    ),
    BadInput(
        "integer-weights",
        "lora",
        lambda folder, pipe: lora_file(folder, pipe, "int.safetensors", _int_weights),
        ("floating point",),
    ),
    BadInput(
        "half-a-layer",
        "lora",
        lambda folder, pipe: lora_file(folder, pipe, "half.safetensors", _drop_b),
        ("lora_b", "missing"),
    ),
    BadInput(
        "lycoris-loha",
        "lora",
        lambda folder, pipe: lora_file(folder, pipe, "loha.safetensors", _loha),
        ("loha", "plain lora"),
    ),
    BadInput(
        "dora",
        "lora",
        lambda folder, pipe: lora_file(folder, pipe, "dora.safetensors", _dora),
        ("dora", "magnitude vector", "plain lora"),
    ),
    BadInput("full-checkpoint", "lora", unet_weights, ("no lora weights",)),
]

# more photos: every case of the probe (issue 17) ------------------------------------------------


def png_16bit_rgb(img: Image.Image) -> bytes:
    """A 48-bit PNG (16 bits per channel; Pillow cannot write one, so it is written here)."""
    a = np.asarray(img.convert("RGB"), np.uint16) * 257
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in a)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", img.width, img.height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def drawn(img: Image.Image, colours: int = 6) -> Image.Image:
    """A face as a cartoon: smoothed, flattened to a few colours, outlined in black (what a drawing
    or a cartoon filter gives; dlib's detector still finds the face in it)."""
    from PIL import ImageFilter

    flat = img.filter(ImageFilter.MedianFilter(5)).quantize(colours, method=Image.Quantize.MEDIANCUT).convert("RGB")
    edges = (
        img.convert("L")
        .filter(ImageFilter.FIND_EDGES)
        .point(lambda v: 0 if v > 40 else 255)
        .filter(ImageFilter.MinFilter(3))
    )
    return Image.composite(flat, Image.new("RGB", img.size, (20, 20, 20)), edges)


def blank(size=(256, 256), colour=(200, 200, 200)) -> Image.Image:
    return Image.new("RGB", size, colour)


def group_photo() -> Image.Image:
    """Three different example faces side by side, the middle one largest."""
    img = Image.new("RGB", (760, 300), (230, 230, 230))
    for i, (x, size) in enumerate(((0, 220), (240, 280), (540, 220))):
        img.paste(face(6 * i + 1, size), (x, (300 - size) // 2))
    return img


def small_face() -> Image.Image:
    img = Image.new("RGB", (400, 400), (180, 180, 180))
    img.paste(face(0, 20), (190, 190))
    return img


def malformed_exif() -> bytes:
    """A JPEG whose EXIF block is garbage after its header."""
    j = encode(face(3))
    junk = b"Exif\0\0II*\0" + b"\xff" * 28
    return j[:2] + b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk + j[2:]


def lying_exif() -> bytes:
    """An upright face whose EXIF orientation tag says to turn it (an editor rotated the pixels and
    left the tag behind)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(face(2), exif=exif.tobytes())


def big_text_png(zipped: bool = True) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 2**21, zip=zipped)
    return encode(face(4), "PNG", pnginfo=info)


def frames(first: Image.Image, second: Image.Image, fmt: str) -> bytes:
    extra = dict(duration=200, loop=0) if fmt in ("WEBP", "GIF") else {}
    return encode(first, fmt, save_all=True, append_images=[second], **extra)


def float_tiff() -> bytes:
    return encode(Image.fromarray(np.asarray(face(5).convert("L"), np.float32) / 255.0, "F"), "TIFF")


def three_good_and(bad: Callable[[], bytes], name: str) -> Callable:
    """Three good photos and one bad one: the bad one is listed, the good ones are kept."""

    def make(folder: Path, pipe) -> list[Path]:
        good = [p for i in range(3) for p in write(folder, f"good_{i}.jpg", encode(face(i)))]
        return good + write(folder, name, bad())

    return make


FIRST_FRAME = ("only the first frame is read", "upload")
DRAWN = ("drawn", "photo")
MORE_PHOTOS = [
    BadInput(
        "thin-strip-30000x16",
        "photo",
        _photo("strip.png", lambda: encode(blank((30000, 16)), "PNG")),
        ("30000x16", "thin strip", "upload a photo"),
    ),
    BadInput(
        "strip-20000x20",
        "photo",
        _photo("banner.png", lambda: encode(blank((20000, 20)), "PNG")),
        ("20000x20", "thin strip"),
    ),
    BadInput(
        "png-text-over-pillows-limit",
        "photo",
        _photo("notes.png", big_text_png),
        ("hidden text or colour-profile data", "save the photo again"),
    ),
    BadInput(
        "png-icc-over-pillows-limit",
        "photo",
        _photo("profile.png", lambda: encode(face(5), "PNG", icc_profile=b"\0" * 2**21)),
        ("colour-profile data", "export it as jpeg"),
    ),
    BadInput(
        "truncated-png",
        "photo",
        _photo("cut.png", lambda: encode(face(1), "PNG")[:3000]),
        ("damaged or truncated", "original photo again"),
    ),
    BadInput("48-bit-png", "photo", _photo("deep48.png", lambda: png_16bit_rgb(face(2))), ("1 usable photo",), 1),
    BadInput(
        "palette-with-transparency",
        "photo",
        _photo("palette.png", lambda: encode(face(3).convert("P", palette=Image.ADAPTIVE), "PNG", transparency=0)),
        ("1 usable photo",),
        1,
    ),
    BadInput(
        "animated-webp-face-in-frame-1",
        "photo",
        _photo("anim.webp", lambda: frames(face(4), blank(), "WEBP")),
        ("1 usable photo",),
        1,
    ),
    BadInput(
        "animated-webp-face-only-in-frame-2",
        "photo",
        _photo("anim2.webp", lambda: frames(blank(), face(4), "WEBP")),
        FIRST_FRAME,
    ),
    BadInput(
        "gif-face-only-in-frame-2", "photo", _photo("anim2.gif", lambda: frames(blank(), face(5), "GIF")), FIRST_FRAME
    ),
    BadInput(
        "multi-page-tiff-face-on-page-2",
        "photo",
        _photo("scan.tiff", lambda: frames(blank(), face(6), "TIFF")),
        FIRST_FRAME,
    ),
    BadInput(
        "multi-page-tiff-face-on-page-1",
        "photo",
        _photo("scan1.tiff", lambda: frames(face(6), blank(), "TIFF")),
        ("1 usable photo",),
        1,
    ),
    BadInput("avif", "photo", _photo("phone.avif", lambda: encode(face(7), "AVIF")), ("1 usable photo",), 1),
    BadInput("still-webp", "photo", _photo("still.webp", lambda: encode(face(8), "WEBP")), ("1 usable photo",), 1),
    BadInput("bmp", "photo", _photo("old.bmp", lambda: encode(face(9), "BMP")), ("1 usable photo",), 1),
    BadInput(
        "png-named-jpg", "photo", _photo("really_a_png.jpg", lambda: encode(face(10), "PNG")), ("1 usable photo",), 1
    ),
    BadInput(
        "greyscale-jpeg", "photo", _photo("grey.jpg", lambda: encode(face(11).convert("L"))), ("1 usable photo",), 1
    ),
    BadInput(
        "lying-exif", "photo", _photo("edited.jpg", lying_exif), ("1 usable photo", "orientation tag", "as stored"), 1
    ),
    BadInput("malformed-exif", "photo", _photo("odd_exif.jpg", malformed_exif), ("1 usable photo",), 1),
    BadInput(
        "lab-tiff", "photo", _photo("lab.tiff", lambda: encode(face(0).convert("LAB"), "TIFF")), ("1 usable photo",), 1
    ),
    BadInput("float-tiff", "photo", _photo("float.tiff", float_tiff), ("1 usable photo",), 1),
    BadInput(
        "three-faces",
        "photo",
        _photo("group.jpg", lambda: encode(group_photo())),
        ("1 usable photo", "3 faces were found", "the largest was used"),
        1,
    ),
    BadInput(
        "20-px-face",
        "photo",
        _photo("far_away.jpg", lambda: encode(small_face())),
        ("no face was found", "at least 100 pixels wide"),
    ),
    BadInput(
        "fully-transparent",
        "photo",
        _photo("nothing.png", lambda: encode(Image.new("RGBA", (256, 256)), "PNG")),
        ("fully transparent", "upload a photo"),
    ),
    BadInput(
        "blank-image",
        "photo",
        _photo("white.png", lambda: encode(blank(colour=(255, 255, 255)), "PNG")),
        ("no face was found",),
    ),
    BadInput("drawn-face-png", "photo", _photo("cartoon.png", lambda: encode(drawn(face(1)), "PNG")), DRAWN),
    BadInput("drawn-face-jpeg", "photo", _photo("cartoon.jpg", lambda: encode(drawn(face(2)), quality=95)), DRAWN),
    BadInput("drawn-face-few-colours", "photo", _photo("poster.png", lambda: encode(drawn(face(3), 4), "PNG")), DRAWN),
    BadInput(
        "huge-icc-in-jpeg",
        "photo",
        _photo(
            "profiled.jpg",
            lambda: encode(
                face(4), icc_profile=np.random.default_rng(0).integers(0, 256, 2**20, dtype=np.uint8).tobytes()
            ),
        ),
        ("1 usable photo",),
        1,
    ),
    BadInput(
        "good-photos-and-a-thin-strip",
        "photos",
        three_good_and(lambda: encode(blank((30000, 16)), "PNG"), "strip.png"),
        ("3 usable photos", "thin strip"),
        3,
    ),
    BadInput(
        "good-photos-and-a-text-bomb",
        "photos",
        three_good_and(big_text_png, "notes.png"),
        ("3 usable photos", "hidden text"),
        3,
    ),
    BadInput(
        "good-photos-and-a-drawing",
        "photos",
        three_good_and(lambda: encode(drawn(face(5)), "PNG"), "toon.png"),
        ("3 usable photos", "drawn"),
        3,
    ),
]


# more LoRA files --------------------------------------------------------------------------------


def raw_file(name: str, header, data: bytes = b"", length: int | None = None) -> Callable:
    """A file laid out like safetensors: 8-byte header length (or ``length``), the header, data."""

    def make(folder: Path, pipe) -> list[Path]:
        head = header if isinstance(header, bytes) else json.dumps(header).encode()
        return write(folder, name, struct.pack("<Q", len(head) if length is None else length) + head + data)

    return make


def edited(name: str, edit: Callable, text_encoder: bool = False, rank: int = 4) -> Callable:
    """A LoRA of the app's own exporter (optionally with a text encoder part, at ``rank``), changed by
    ``edit(tensors, meta)``."""

    def make(folder: Path, pipe) -> list[Path]:
        from safetensors import safe_open

        from core.finetune.lora import save_lora

        path = save_lora(Path(folder) / name, random_lora(pipe, rank=rank, text_encoder=text_encoder))
        with safe_open(str(path), "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        edit(tensors, meta)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
        return [path]

    return make


def _adapter(meta, **changes):
    a = json.loads(meta["lora_adapter_metadata"])
    a.update(changes)
    meta["lora_adapter_metadata"] = json.dumps(a)


def _transpose(t, meta):
    for k in t:
        if t[k].ndim == 2:
            t[k] = t[k].T.contiguous()


def _swap(t, meta):
    for k in [k for k in t if k.endswith("lora_A.weight") and t[k].ndim == 2]:
        b = k.replace("lora_A", "lora_B")
        t[k], t[b] = t[b], t[k]


def _only_text_encoder(t, meta):
    for k in [k for k in t if k.startswith("unet.")]:
        del t[k]


def _text_encoder_peft(t, meta):
    """Text-encoder-only, in peft naming (what peft's own save writes)."""
    _only_text_encoder(t, meta)
    for k in list(t):
        t[
            k.replace("lora_linear_layer.down", "lora_A")
            .replace("lora_linear_layer.up", "lora_B")
            .replace(".lora.down.", ".lora_A.")
            .replace(".lora.up.", ".lora_B.")
        ] = t.pop(k)


def _pad_rank(t, meta, rank):
    """The same LoRA at a higher rank (zero rows / columns added; the product B·A is unchanged)."""
    for k in t:
        if "lora_A" in k:
            t[k] = torch.cat([t[k], torch.zeros(rank - t[k].shape[0], *t[k].shape[1:])])
        else:
            t[k] = torch.cat([t[k], torch.zeros(t[k].shape[0], rank - t[k].shape[1], *t[k].shape[2:])], dim=1)
    _adapter(meta, **{"unet.r": rank})


def _rank0(t, meta):
    for k in t:
        t[k] = t[k][:0].contiguous() if "lora_A" in k else t[k][:, :0].contiguous()


def _dtype_mix(t, meta):
    for i, k in enumerate(sorted(t)):
        t[k] = t[k].half() if i % 2 else t[k].bfloat16()


def _many_tensors(t, meta):
    for i in range(10_000):
        t[f"unet.extra.{i}.lora_A.weight"] = torch.zeros(1)


def _inf(t, meta):
    k = _first(t, "lora_B.weight")
    t[k][0].fill_(float("inf"))


def _huge_values(t, meta):
    for k in t:
        t[k] = torch.full_like(t[k], 3e38) * (1 if "lora_A" in k else -1)


def _sd15_layout(folder: Path, pipe) -> list[Path]:
    """Stable Diffusion 1.5's layer names and sizes (320/640/1280 channels), peft naming."""
    t = {}
    for block, ch in ((0, 320), (1, 640), (2, 1280)):
        for proj in ("to_q", "to_k", "to_v"):
            name = f"unet.down_blocks.{block}.attentions.0.transformer_blocks.0.attn1.{proj}"
            t[f"{name}.lora_A.weight"] = torch.randn(4, ch) * 0.01
            t[f"{name}.lora_B.weight"] = torch.zeros(ch, 4)
    path = Path(folder) / "sd15_face.safetensors"
    save_file(t, str(path))
    return [path]


def _header(tensors: dict, meta: dict | None = None) -> dict:
    h = {k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in tensors.items()}
    return {**h, **({"__metadata__": meta} if meta else {})}


A_KEY, B_KEY = "unet.conv_in.lora_A.weight", "unet.conv_in.lora_B.weight"
NEXT = ("export the lora again",)
MORE_LORAS = [
    BadInput(
        "header-length-2-to-the-60",
        "lora",
        raw_file("long.safetensors", b"{}", length=2**60),
        ("not a readable .safetensors file", "not a valid safetensors header"),
    ),
    BadInput(
        "eight-byte-file",
        "lora",
        lambda folder, pipe: write(folder, "tiny.safetensors", struct.pack("<Q", 2)),
        ("not a readable .safetensors file", "not a valid safetensors header"),
    ),
    BadInput("json-array-header", "lora", raw_file("array.safetensors", b"[1, 2, 3]"), ("not a json object",)),
    BadInput(
        "empty-json-header", "lora", raw_file("nothing.safetensors", b"{}"), ("no lora weights", "no tensors at all")
    ),
    BadInput(
        "overlapping-offsets",
        "lora",
        raw_file(
            "overlap.safetensors",
            _header({A_KEY: ("F32", [4, 4], [0, 64]), B_KEY: ("F32", [4, 4], [32, 96])}),
            bytes(96),
        ),
        ("share bytes",),
    ),
    BadInput(
        "dtype-byte-length-mismatch",
        "lora",
        raw_file("mismatch.safetensors", _header({A_KEY: ("F32", [4, 4], [0, 32])}), bytes(32)),
        ("declared as 16 values of f32", "given 32 bytes"),
    ),
    BadInput(
        "2-to-the-40-elements",
        "lora",
        raw_file("vast.safetensors", _header({A_KEY: ("F32", [2**20, 2**20], [0, 64])}), bytes(64)),
        ("1099511627776 values",),
    ),
    BadInput(
        "offsets-beyond-the-file",
        "lora",
        raw_file("short.safetensors", _header({A_KEY: ("F32", [4, 4], [0, 64])}), bytes(16)),
        ("beyond the end of the file",),
    ),
    BadInput(
        "duplicate-json-keys",
        "lora",
        raw_file(
            "twice.safetensors",
            (
                b'{"' + A_KEY.encode() + b'": {"dtype": "F32", "shape": [1], "data_offsets": '
                b'[0, 4]}, "' + A_KEY.encode() + b'": {"dtype": "F32", "shape": [1], '
                b'"data_offsets": [0, 4]}}'
            ),
            bytes(4),
        ),
        ("twice",),
    ),
    BadInput(
        "deeply-nested-header",
        "lora",
        raw_file("deep.safetensors", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("nested far deeper",),
    ),
    BadInput(
        "ten-megabyte-metadata",
        "lora",
        raw_file("chatty.safetensors", _header({A_KEY: ("F32", [1], [0, 4])}, {"notes": "x" * 10 * 2**20}), bytes(4)),
        ("metadata", "a few kb"),
    ),
    BadInput("ten-thousand-tensors", "lora", edited("many.safetensors", _many_tensors), ("10", "tensors", "accepted")),
    BadInput("infinite-weights", "lora", edited("inf.safetensors", _inf), ("nan or infinite",)),
    BadInput("weights-3e38", "lora", edited("huge_values.safetensors", _huge_values), ("times its own size", *NEXT)),
    BadInput(
        "alpha-1e308",
        "lora",
        edited("alpha.safetensors", lambda t, m: _adapter(m, **{"unet.lora_alpha": 1e308})),
        ("times its own size", "alpha 1e+308"),
    ),
    BadInput(
        "negative-alpha",
        "lora",
        edited("neg.safetensors", lambda t, m: _adapter(m, **{"unet.lora_alpha": -4})),
        ("lora alpha", "positive finite number"),
    ),
    BadInput(
        "deeply-nested-adapter-metadata",
        "lora",
        edited("deepmeta.safetensors", lambda t, m: m.update(lora_adapter_metadata="[" * 100_000 + "]" * 100_000)),
        ("lora_adapter_metadata", "not a valid json object"),
    ),
    BadInput(
        "rank-300", "lora", edited("r300.safetensors", lambda t, m: _pad_rank(t, m, 300)), ("rank is 300", "1 to 256")
    ),
    BadInput("rank-0", "lora", edited("r0.safetensors", _rank0), ("rank is 0", "changes nothing")),
    BadInput("transposed-shapes", "lora", edited("transposed.safetensors", _transpose), ("stored transposed", *NEXT)),
    BadInput("swapped-a-and-b", "lora", edited("swapped.safetensors", _swap), ("swapped", *NEXT)),
    BadInput(
        "text-encoder-only",
        "lora",
        edited("te.safetensors", _only_text_encoder, text_encoder=True),
        ("only the text encoder", "adapts the unet"),
    ),
    BadInput(
        "text-encoder-only-peft-naming",
        "lora",
        edited("te_peft.safetensors", _text_encoder_peft, text_encoder=True),
        ("only the text encoder", "adapts the unet"),
    ),
    BadInput(
        "sd15-layout-peft-naming", "lora", _sd15_layout, ("this base model", "fine-tuned from this app's base model")
    ),
    BadInput(
        "float64-weights",
        "lora",
        edited("f64.safetensors", lambda t, m: t.update({k: v.double() for k, v in t.items()})),
        ("stored as 'f64'", "floating point"),
    ),
    # files the app reads: the attack runs (and says what it ignored)
    BadInput(
        "f16-bf16-mix", "lora-ok", edited("mixed.safetensors", _dtype_mix), ("attacked the uploaded lora", "rank 4")
    ),
    BadInput(
        "rank-256",
        "lora-ok",
        edited("r256.safetensors", lambda t, m: _pad_rank(t, m, 256)),
        ("attacked the uploaded lora", "rank 256"),
    ),
    BadInput(
        "leaklab-steps-2-to-the-63",
        "lora-ok",
        edited("s63.safetensors", lambda t, m: m.update(leaklab_steps=str(2**63))),
        ("9223372036854775808", "is ignored", "fine-tuning step 80 (from your input"),
    ),
    BadInput(
        "leaklab-steps-10-to-the-4000",
        "lora-ok",
        edited("s4000.safetensors", lambda t, m: m.update(leaklab_steps="1" + "0" * 4000)),
        ("is ignored", "fine-tuning step 80 (from your input"),
    ),
]


# settings of the Train and Draw buttons (values, not files) --------------------------------------


def values(*v) -> Callable:
    return lambda folder, pipe: list(v)


SEED_WORDS = ("seed must be a whole number", "empty for a fresh random one")
SETTINGS = [
    # Train: steps, rank, lr, seed, text encoder, DP-SGD, its noise, post-hoc defense, its strength
    BadInput("seed-1e30", "train", values(20, 4, 3e-3, 1e30, False, False, 1.0, "none", 0.9), SEED_WORDS),
    BadInput("negative-seed", "train", values(20, 4, 3e-3, -1, False, False, 1.0, "none", 0.9), SEED_WORDS),
    BadInput("seed-2-to-the-31", "train", values(20, 4, 3e-3, 2**31, False, False, 1.0, "none", 0.9), SEED_WORDS),
    BadInput(
        "learning-rate-5", "train", values(20, 4, 5.0, 0, False, False, 1.0, "none", 0.9), ("lr must be in (0, 1)",)
    ),
    # Gradio's own checks of its widgets' ranges and choices
    BadInput(
        "a-billion-steps",
        "train",
        values(10**9, 4, 3e-3, 0, False, False, 1.0, "none", 0.9),
        ("greater than maximum value 600",),
    ),
    BadInput(
        "rank-0-setting",
        "train",
        values(20, 0, 3e-3, 0, False, False, 1.0, "none", 0.9),
        ("value 0 is less than minimum value 1",),
    ),
    BadInput(
        "negative-dp-noise",
        "train",
        values(20, 4, 3e-3, 0, False, True, -1.0, "none", 0.9),
        ("less than minimum value 0",),
    ),
    BadInput(
        "unknown-defense",
        "train",
        values(20, 4, 3e-3, 0, False, False, 1.0, "magic", 0.9),
        ("magic is not in the list of choices",),
    ),
    BadInput("sample-seed-1e30", "sample", values(1e30, 1, 5, 1.0), ("seed must be",)),
]


CASES += MORE_PHOTOS + MORE_LORAS + SETTINGS
assert len(CASES) >= 75 and len({c.name for c in CASES}) == len(CASES)


def make_case(case: BadInput, folder: Path, pipe) -> list[Path]:
    folder = Path(folder) / case.name
    folder.mkdir(parents=True, exist_ok=True)
    return case.make(folder, pipe)
