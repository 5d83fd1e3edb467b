"""Identity-grouped face folders (the LFW layout), the training crop, and the identity split.

Layout read: ``<root>/<Name>/<Name>_NNNN.jpg`` (any folder laid out the same way works).
The root comes from ``--data`` flags, else ``$LEAKLAB_LFW``, else ``../shared/data/lfw-deepfunneled``
relative to the project root.

Training crop (used by every model and metric of the project): LFW deep-funneled images are
250x250 with the face centred; the central 128x128 region (pixels 61..189 on both axes) holds the
face tightly. We take exactly that box and resize it to 64x64 (bicubic, antialiased): the "LFW crop"
of docs/EVAL. Visitor photos are aligned onto the same geometry by :mod:`core.faces.ingest`.

Split (deterministic, by identity, recorded in ``assets/split.json``):
- victims: 20 % of the identities with >= 5 photos, drawn with a fixed seed; never seen by the
  base model, the shadow population or the attacker;
- shadow: every other identity with >= 4 photos (the attacker's public people);
- pretrain: all remaining identities (1-3 photos each); the base model trains on these only.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from core import ASSETS, PROJECT_ROOT

CROP_BOX = (71, 71, 179, 179)  # (left, top, right, bottom) in the 250x250 deep-funneled image (108 px)
IMAGE_SIZE = 128  # the embedded model's resolution
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SPLIT_FILE = ASSETS / "split.json"


def default_lfw_root() -> Path:
    """The LFW folder: ``$LEAKLAB_LFW`` if set, else ``../shared/data/lfw-deepfunneled``."""
    env = os.environ.get("LEAKLAB_LFW")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data" / "lfw-deepfunneled"


def default_utkface_root() -> Path:
    """The UTKFace folder: ``$LEAKLAB_UTKFACE`` if set, else ``../data/UTKFace`` beside the project."""
    env = os.environ.get("LEAKLAB_UTKFACE")
    return Path(env) if env else PROJECT_ROOT.parent / "data" / "UTKFace"


def utkface_files(root: str | Path | None = None) -> list[Path]:
    """UTKFace chips sorted by name, exact duplicates dropped (the first name of each content kept)."""
    root = Path(root or default_utkface_root())
    if not root.is_dir():
        raise FileNotFoundError(
            f"UTKFace folder not found: {root} (set --utkface or $LEAKLAB_UTKFACE; "
            "../shared/data/README.md says how to extract it)"
        )
    seen, out = set(), []
    for f in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        h = hashlib.sha256(f.read_bytes()).digest()
        if h not in seen:
            seen.add(h)
            out.append(f)
    return out


def utkface_attributes(path: str | Path) -> dict:
    """Age, gender and race from a UTKFace file name (None where the name lacks the field)."""
    parts = Path(path).name.split("_")
    num = lambda i: int(parts[i]) if len(parts) > i and parts[i].strip().isdigit() else None
    return dict(age=num(0), gender=num(1), race=num(2) if len(parts) > 3 else None)


def utkface_heldout(files: list[Path], n: int = 512, seed: int = 0) -> set[str]:
    """Names of ``n`` chips (fixed by ``seed``) the base model never trains on."""
    names = sorted(f.name for f in files)
    return set(random.Random(seed).sample(names, min(n, len(names))))


def list_identities(root: str | Path, cap: int | None = None) -> dict[str, list[Path]]:
    """Map identity name -> its image paths sorted by file name (at most ``cap`` per identity)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"face folder not found: {root} (set --data or $LEAKLAB_LFW)")
    people: dict[str, list[Path]] = {}
    for person in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in person.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            people[person.name] = files[:cap] if cap else files
    return people


def crop_face(img: Image.Image, box=CROP_BOX, size: int = IMAGE_SIZE) -> Image.Image:
    """The fixed central box of an LFW deep-funneled image -> size x size RGB (see the module docstring)."""
    return img.convert("RGB").crop(box).resize((size, size), Image.BICUBIC)


def fixed_crop(path: str | Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """Read one LFW-layout image and return its fixed central crop as uint8 HxWx3."""
    with Image.open(path) as img:
        return np.asarray(crop_face(img, size=size))


def fixed_crops(paths, size: int = IMAGE_SIZE) -> np.ndarray:
    """Fixed central crops of many LFW images, stacked as uint8 N x H x W x 3."""
    return np.stack([fixed_crop(p, size) for p in paths]) if paths else np.zeros((0, size, size, 3), np.uint8)


@dataclass
class Split:
    """Identity split shared by every command (see module docstring)."""

    seed: int
    victim_fraction: float
    cap: int
    victims: list[str] = field(default_factory=list)
    shadow: list[str] = field(default_factory=list)
    pretrain: list[str] = field(default_factory=list)
    fingerprint: str = ""  # hash of the identity -> file-count table it was made from

    def __post_init__(self):
        if not 0.0 < self.victim_fraction < 1.0:
            raise ValueError(f"victim_fraction must be in (0, 1), got {self.victim_fraction!r}")
        if self.cap < 5:
            raise ValueError(f"cap must be >= 5 (victims need 5 private photos), got {self.cap!r}")
        overlap = (set(self.victims) & set(self.shadow)) | (set(self.victims) | set(self.shadow)) & set(self.pretrain)
        if overlap:
            raise ValueError(f"split groups overlap: {sorted(overlap)[:5]}")

    def save(self, path: str | Path = SPLIT_FILE) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path = SPLIT_FILE) -> Split:
        return cls(**json.loads(Path(path).read_text()))

    def paths(self, group: str, root: str | Path | None = None) -> dict[str, list[Path]]:
        """Image paths (capped, sorted by name) of every identity in ``group``."""
        names = getattr(self, group)
        people = list_identities(root or default_lfw_root(), cap=self.cap)
        return {n: people[n] for n in names if n in people}


def _fingerprint(counts: dict[str, int]) -> str:
    blob = "\n".join(f"{k}\t{v}" for k, v in sorted(counts.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_split(root: str | Path | None = None, seed: int = 0, victim_fraction: float = 0.2, cap: int = 20) -> Split:
    """Deterministic identity split of a face folder (same folder + seed -> same split)."""
    counts = {n: len(f) for n, f in list_identities(root or default_lfw_root()).items()}
    five = sorted(n for n, c in counts.items() if c >= 5)
    rng = random.Random(seed)
    victims = sorted(rng.sample(five, round(victim_fraction * len(five))))
    vset = set(victims)
    shadow = sorted(n for n, c in counts.items() if c >= 4 and n not in vset)
    sset = vset | set(shadow)
    pretrain = sorted(n for n in counts if n not in sset)
    return Split(seed, victim_fraction, cap, victims, shadow, pretrain, _fingerprint(counts))


@dataclass
class SplitArgs:
    """Make (or check) the identity split in assets/split.json."""

    data: str | None = None  # LFW-layout folder (default $LEAKLAB_LFW or ../shared/data/lfw-deepfunneled)
    seed: int = 0  # seed of the victim draw
    victim_fraction: float = 0.2  # share of the identities with >= 5 photos that become victims
    cap: int = 20  # max photos used per identity
    out: str = str(SPLIT_FILE)  # where the split is written


def main(argv=None):
    from core.cli import parse

    a = parse(SplitArgs, argv)
    s = make_split(a.data, a.seed, a.victim_fraction, a.cap)
    s.save(a.out)
    print(f"victims {len(s.victims)}  shadow {len(s.shadow)}  pretrain {len(s.pretrain)} identities -> {a.out}")


if __name__ == "__main__":
    main()
