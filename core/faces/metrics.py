"""The identity protocol of docs/EVAL: dlib descriptors, distance, same-person threshold,
identification rank, and the quality measures of generated faces.

- descriptor: :func:`core.faces.recognition.describe` (64 px crop -> 150 px bicubic -> dlib 128-d);
- distance: Euclidean; same person when < ``SAME_PERSON`` (0.6, dlib's threshold);
- rank: position of the true identity when a probe's distance to every gallery entry is sorted;
- Frechet distance between descriptor sets (as FID, but in dlib's identity space);
- face-detection rate of a set of images.
``python -m core.faces.metrics`` validates the descriptor on LFW ``pairs.txt`` at 64 px.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.faces import data
from core.faces import recognition as faces

SAME_PERSON = 0.6


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance between descriptors (broadcasts over leading axes)."""
    return np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=-1)


def gallery_entry(descriptors: np.ndarray) -> np.ndarray:
    """An identity's gallery entry: the mean descriptor of its photos."""
    return np.asarray(descriptors, np.float64).reshape(-1, 128).mean(axis=0)


def ranks(probes: np.ndarray, gallery: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """1-based rank of gallery[truth[i]] among all gallery entries sorted by distance to probes[i]."""
    d = distance(np.asarray(probes)[:, None, :], np.asarray(gallery)[None, :, :])
    own = d[np.arange(len(d)), truth]
    return (d < own[:, None]).sum(axis=1) + 1


def bootstrap_ci(values, stat=np.mean, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over the items of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    boots = np.array([stat(v[rng.integers(0, len(v), len(v))]) for _ in range(n)])
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two descriptor sets (FID's formula)."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)  # (scipy 1.17 deprecated disp=; a failed root shows as non-finite)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def detection_rate(images) -> float:
    """Fraction of images in which dlib's frontal detector finds a face (see faces.has_face)."""
    images = list(images)
    return float(np.mean([faces.has_face(im) for im in images])) if images else float("nan")


# LFW pairs validation -------------------------------------------------------------------------


def read_pairs(path: str | Path, n_same: int = 150, n_diff: int = 150):
    """First ``n_same`` same-person and ``n_diff`` different-person pairs of LFW pairs.txt
    (its first fold: 300 same then 300 different lines)."""
    lines = Path(path).read_text().split("\n")[1:]
    same, diff = [], []
    for ln in lines:
        f = ln.split()
        if len(f) == 3 and len(same) < n_same:
            same.append(((f[0], int(f[1])), (f[0], int(f[2]))))
        elif len(f) == 4 and len(diff) < n_diff:
            diff.append(((f[0], int(f[1])), (f[2], int(f[3]))))
    return same, diff


def verify_pairs(root: str | Path, size: int = 64, n: int = 150) -> dict:
    """Verification accuracy at threshold 0.6 on LFW pairs, crops resized to ``size`` px."""
    root = Path(root)
    same, diff = read_pairs(root / "pairs.txt", n, n)
    img = lambda name, k: data.fixed_crop(root / name / f"{name}_{k:04d}.jpg", size)
    out = {}
    for label, pairs in (("same", same), ("diff", diff)):
        a = faces.describe([img(*p[0]) for p in pairs])
        b = faces.describe([img(*p[1]) for p in pairs])
        out[label] = distance(a, b)
    correct = np.concatenate([out["same"] < SAME_PERSON, out["diff"] >= SAME_PERSON])
    return dict(
        size=size,
        pairs=2 * n,
        accuracy=float(correct.mean()),
        same_mean_distance=float(out["same"].mean()),
        diff_mean_distance=float(out["diff"].mean()),
    )


@dataclass
class PairsArgs:
    """Validate the identity descriptor on LFW pairs.txt (verification accuracy at distance 0.6)."""

    data: str | None = None  # LFW folder (default $LEAKLAB_LFW or ../shared/data/lfw-deepfunneled)
    sizes: tuple[int, ...] = (128, 64, 32)  # crop sizes to test (the fixed central crop resized to each)
    out: str | None = None  # write the results as JSON here


def main(argv=None):
    from core.cli import parse

    a = parse(PairsArgs, argv)
    root = a.data or data.default_lfw_root()
    res = [verify_pairs(root, s) for s in a.sizes]
    for r in res:
        print(
            f"{r['size']:>4} px: accuracy {r['accuracy']:.3f} on {r['pairs']} pairs "
            f"(mean distance same {r['same_mean_distance']:.3f}, different {r['diff_mean_distance']:.3f})"
        )
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
