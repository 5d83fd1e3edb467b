import numpy as np

from core.faces import data, metrics
from core.faces import recognition as faces


def test_same_person_closer_than_different_people(lfw_root):
    split = data.Split.load()
    people = split.paths("victims", lfw_root)
    names = list(people)[:6]
    d = faces.describe([data.fixed_crop(people[n][i]) for n in names for i in (0, 1)]).reshape(len(names), 2, 128)
    same = metrics.distance(d[:, 0], d[:, 1])
    diff = metrics.distance(d[:, 0], np.roll(d[:, 1], 1, axis=0))
    assert same.mean() < diff.mean()
    assert (same < metrics.SAME_PERSON).mean() >= 0.5


def test_ranks():
    gallery = np.eye(4, 128)
    probes = gallery[[2, 0]] + 0.01
    assert metrics.ranks(probes, gallery, np.array([2, 0])).tolist() == [1, 1]
    assert metrics.ranks(probes, gallery, np.array([1, 3])).tolist() == [2, 2]


def test_frechet_distance_zero_for_same_set_and_grows_with_shift():
    x = np.random.default_rng(0).normal(size=(300, 128)) * 0.05
    assert abs(metrics.frechet_distance(x, x)) < 1e-6
    assert metrics.frechet_distance(x, x + 0.1) > metrics.frechet_distance(x, x + 0.01) > 0


def test_bootstrap_interval_contains_the_mean():
    v = np.random.default_rng(1).normal(0.5, 0.1, 50)
    lo, hi = metrics.bootstrap_ci(v)
    assert lo < v.mean() < hi


def test_detection_rate_real_vs_noise(lfw_root):
    split = data.Split.load()
    crops = [data.fixed_crop(ps[0]) for ps in list(split.paths("victims", lfw_root).values())[:10]]
    noise = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(10)]
    assert metrics.detection_rate(crops) >= 0.9
    assert metrics.detection_rate(noise) == 0.0
