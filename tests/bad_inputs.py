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
import os
import pickle
import struct
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from core import ASSETS

EXAMPLE_FACES = sorted((ASSETS / "examples").glob("*/*.png"))


@dataclass(frozen=True)
class BadInput:
    name: str
    kind: str  # "photo": one upload to the Fine-tune tab; "photos": a set of them; "lora": the Attack tab
    make: Callable  # make(folder, pipe) -> list of paths it wrote
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
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


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
        out += write(folder, f"private-{tag}-{i}-{os.getpid()}.png", encode(Image.open(p).convert("RGB"), "PNG", pnginfo=info))
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
        t.update({f"{name}.hada_w1_a": b.flatten(1), f"{name}.hada_w1_b": a.flatten(1),
                  f"{name}.hada_w2_a": b.flatten(1).clone(), f"{name}.hada_w2_b": a.flatten(1).clone(),
                  f"{name}.alpha": torch.tensor(4.0)})


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
    """A real safetensors file with one 68 MB tensor (over the 64 MB limit)."""
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
    BadInput("text-file-as-photo", "photo", _photo("notes.jpg", lambda: b"shopping list: eggs, milk\n" * 40),
             ("not an image", "jpeg, png")),
    BadInput("empty-file", "photo", _photo("empty.jpg", lambda: b""), ("empty (0 bytes)", "upload a photo")),
    BadInput("truncated-jpeg", "photo", _photo("cut.jpg", lambda: encode(face(0))[:1500]),
             ("damaged or truncated", "original photo again")),
    BadInput("40-megapixels", "photo", _photo("huge.jpg", lambda: encode(Image.new("RGB", (8000, 5000), (90, 120, 150)),
                                                                        quality=30)),
             ("40 megapixels", "under 30 megapixels")),
    BadInput("decompression-bomb", "photo", _photo("bomb.png", lambda: png_header_only(30000, 30000)),
             ("too many pixels", "under 30 megapixels")),
    BadInput("over-30-mb", "photo", _photo("big.jpg", lambda: b"\xff\xd8\xff\xe0" + bytes(31 * 2**20)),
             ("larger than 30 mb", "smaller photo")),
    BadInput("tiny-image", "photo", _photo("icon.png", lambda: encode(Image.new("RGB", (8, 8)), "PNG")),
             ("only 8x8 pixels", "larger photo")),
    BadInput("html-renamed-jpg", "photo", _photo("page.jpg", lambda: b"<!DOCTYPE html><html><body><img src='me.jpg'>"
                                                                    b"</body></html>"),
             ("web page", "save the image itself")),
    BadInput("svg-drawing", "photo", _photo("face.svg", lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/'
                                                                b'2000/svg" width="64" height="64"><circle cx="32" '
                                                                b'cy="32" r="20"/></svg>'),
             ("svg", "drawing", "jpeg or png")),
    BadInput("heic-from-a-phone", "photo", _photo("IMG_0001.HEIC", lambda: b"\0\0\0\x18ftypheic\0\0\0\0mif1heic"
                                                                          + bytes(200)),
             ("heic/heif photo", "export it as jpeg")),
    BadInput("video-clip", "photo", _photo("clip.mp4", lambda: b"\0\0\0\x20ftypisom\0\0\x02\0isomiso2mp41" + bytes(100)),
             ("a video", "still photo")),
    BadInput("pdf-document", "photo", _photo("scan.pdf", lambda: b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer\n%%EOF\n"),
             ("pdf document", "the photo itself")),
    BadInput("zip-renamed-jpg", "photo", _photo("photos.jpg", lambda: b"PK\x03\x04" + bytes(100)),
             ("zip archive", "unzip")),
    BadInput("random-noise", "photo",
             _photo("noise.png", lambda: encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3),
                                                                                                   dtype=np.uint8)), "PNG")),
             NO_FACE),
    BadInput("landscape", "photo", _photo("holiday.jpg", lambda: encode(landscape())), NO_FACE),
    BadInput("cartoon-face", "photo", _photo("smiley.png", lambda: encode(cartoon(), "PNG")), NO_FACE),
    BadInput("upside-down-face", "photo", _photo("upside.jpg", lambda: encode(face(2).rotate(180))), NO_FACE),
    # unusual but usable photos: converted, and kept
    BadInput("cmyk-jpeg", "photo", _photo("print.jpg", lambda: encode(face(3).convert("CMYK"))), ("1 usable photo",), 1),
    BadInput("16-bit-png", "photo",
             _photo("deep.png", lambda: encode(Image.fromarray(np.asarray(face(4).convert("L"), np.uint16) * 257), "PNG")),
             ("1 usable photo",), 1),
    BadInput("animated-gif", "photo",
             _photo("anim.gif", lambda: encode(face(5), "GIF", save_all=True, append_images=[face(6)], duration=200)),
             ("1 usable photo",), 1),
    BadInput("exif-rotated", "photo", _photo("phone.jpg", exif_rotated), ("1 usable photo",), 1),
    BadInput("transparent-png", "photo", _photo("cutout.png", lambda: encode(face(7).convert("RGBA"), "PNG")),
             ("1 usable photo",), 1),
    # photo sets
    BadInput("one-photo", "photos", many_photos(1), ("1 usable photo", "at least 3"), 1),
    BadInput("fifty-photos", "photos", many_photos(50), ("50 usable photos", "only the first 10"), 50),
    # LoRA files for the Attack tab
    BadInput("pickle-ckpt", "lora", lambda folder, pipe: write(folder, "lora.ckpt", pickle.dumps({"state_dict": {}})),
             ("python pickle", "arbitrary code", "convert it to .safetensors")),
    BadInput("torch-zip-renamed", "lora", torch_zip, ("zip archive", "arbitrary code")),
    BadInput("empty-lora", "lora", lambda folder, pipe: write(folder, "empty.safetensors", b""), ("empty (0 bytes)",)),
    BadInput("random-bytes", "lora",
             lambda folder, pipe: write(folder, "noise.safetensors", np.random.default_rng(1).integers(
                 0, 256, 4096, dtype=np.uint8).tobytes()), ("not a readable .safetensors file",)),
    BadInput("photo-renamed-lora", "lora", lambda folder, pipe: write(folder, "me.safetensors", encode(face(0))),
             ("not a readable .safetensors file",)),
    BadInput("broken-header", "lora", bad_header, ("header is not valid json",)),
    BadInput("huge-tensor", "lora", huge_tensor, ("mb", "up to 64.0 mb are accepted")),
    BadInput("wrong-shapes", "lora", lambda folder, pipe: lora_file(folder, pipe, "shapes.safetensors", _wrong_shape),
             ("has shape", "does not fit this model")),
    BadInput("nan-weights", "lora", lambda folder, pipe: lora_file(folder, pipe, "nan.safetensors", _nan),
             ("nan or infinite",)),
    BadInput("other-base-model", "lora", lambda folder, pipe: lora_file(folder, pipe, "sd15.safetensors", _other_base),
             ("different base model", "stable-diffusion-v1-5", "fine-tuned from this app's base model")),
    BadInput("integer-weights", "lora", lambda folder, pipe: lora_file(folder, pipe, "int.safetensors", _int_weights),
             ("floating point",)),
    BadInput("half-a-layer", "lora", lambda folder, pipe: lora_file(folder, pipe, "half.safetensors", _drop_b),
             ("lora_b", "missing")),
    BadInput("lycoris-loha", "lora", lambda folder, pipe: lora_file(folder, pipe, "loha.safetensors", _loha),
             ("loha", "plain lora")),
    BadInput("dora", "lora", lambda folder, pipe: lora_file(folder, pipe, "dora.safetensors", _dora),
             ("dora", "magnitude vector", "plain lora")),
    BadInput("full-checkpoint", "lora", unet_weights, ("no lora weights",)),
]

assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)


def make_case(case: BadInput, folder: Path, pipe) -> list[Path]:
    folder = Path(folder) / case.name
    folder.mkdir(parents=True, exist_ok=True)
    return case.make(folder, pipe)
