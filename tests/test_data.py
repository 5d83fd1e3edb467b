import numpy as np
import pytest
from PIL import Image

from core.faces import data


def _fake_lfw(root, counts):
    for name, k in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(1, k + 1):
            Image.new("RGB", (250, 250), (i * 20 % 255, 80, 120)).save(root / name / f"{name}_{i:04d}.jpg")
    return root


COUNTS = {f"P{i:03d}": (i % 9) + 1 for i in range(60)}


def test_split_is_deterministic_and_disjoint(tmp_path):
    root = _fake_lfw(tmp_path / "lfw", COUNTS)
    a, b = data.make_split(root, seed=3), data.make_split(root, seed=3)
    assert a == b
    v, s, p = set(a.victims), set(a.shadow), set(a.pretrain)
    assert not (v & s) and not (v & p) and not (s & p)
    assert v | s | p == set(COUNTS)
    assert all(COUNTS[n] >= 5 for n in v)
    assert all(COUNTS[n] >= 4 for n in s)
    assert all(COUNTS[n] < 4 for n in p)
    five = [n for n, c in COUNTS.items() if c >= 5]
    assert len(v) == round(0.2 * len(five))
    assert data.make_split(root, seed=4).victims != a.victims  # the seed matters


def test_split_roundtrip_and_validation(tmp_path):
    root = _fake_lfw(tmp_path / "lfw", COUNTS)
    s = data.make_split(root)
    s.save(tmp_path / "split.json")
    assert data.Split.load(tmp_path / "split.json") == s
    with pytest.raises(ValueError, match="overlap"):
        data.Split(0, 0.2, 20, victims=["x"], shadow=["x"])
    with pytest.raises(ValueError, match="victim_fraction"):
        data.Split(0, 1.5, 20)


def test_cap_and_sorting(tmp_path):
    root = _fake_lfw(tmp_path / "lfw", {"A_B": 9})
    files = data.list_identities(root, cap=5)["A_B"]
    assert [f.name for f in files] == [f"A_B_{i:04d}.jpg" for i in range(1, 6)]


def test_crop_is_the_central_box():
    img = Image.new("RGB", (250, 250), (0, 0, 0))
    img.paste((255, 255, 255), data.CROP_BOX)
    crop = np.asarray(data.crop_face(img))
    assert crop.shape == (data.IMAGE_SIZE, data.IMAGE_SIZE, 3)
    assert crop[2:-2, 2:-2].min() > 240  # the box fills the crop


def test_shipped_split_matches_the_data(lfw_root):
    shipped = data.Split.load()
    remade = data.make_split(lfw_root, shipped.seed, shipped.victim_fraction, shipped.cap)
    assert remade == shipped
    assert len(shipped.victims) >= 50
