"""Results cached by content (core.cache): the hash sees every byte of arrays and tensors, also inside
lists and dicts, and a cached result is computed once."""

import numpy as np
import torch

from core.cache import cached, digest


def test_digest_sees_tensors_inside_containers():
    lora = {"a.lora_A.weight": torch.zeros(4, 8), "a.lora_B.weight": torch.zeros(8, 4)}
    base = digest("point", [lora], [[np.zeros((2, 2), np.uint8)]])
    changed = {**lora, "a.lora_B.weight": lora["a.lora_B.weight"].clone().index_fill_(0, torch.tensor([3]), 1e-6)}
    assert digest("point", [changed], [[np.zeros((2, 2), np.uint8)]]) != base
    assert digest("point", [lora], [[np.ones((2, 2), np.uint8)]]) != base
    assert digest("point", [dict(reversed(list(lora.items())))], [[np.zeros((2, 2), np.uint8)]]) == base


def test_cached_computes_once(monkeypatch, tmp_path):
    monkeypatch.setenv("LEAKLAB_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"x": 1.5}

    assert cached("t", ["k", np.arange(3)], compute) == {"x": 1.5}
    assert cached("t", ["k", np.arange(3)], compute) == {"x": 1.5} and len(calls) == 1
    cached("t", ["k", np.arange(4)], compute)
    assert len(calls) == 2


def test_digest_sees_shape_and_dtype():
    assert digest(torch.zeros(2, 3)) != digest(torch.zeros(3, 2))
    assert digest(np.zeros((2, 3))) != digest(np.zeros((3, 2)))
    assert digest(torch.zeros(4, dtype=torch.float16)) != digest(torch.zeros(2, dtype=torch.float32))
    assert digest(torch.zeros(2, 3)) == digest(torch.zeros(2, 3))


def test_a_truncated_cache_entry_is_recomputed_and_writes_are_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("LEAKLAB_CACHE", str(tmp_path))
    path = tmp_path / "t" / f"{digest('k')}.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"x": 1.')  # what a crash mid-write used to leave
    assert cached("t", ["k"], lambda: {"x": 2.0}) == {"x": 2.0}
    assert path.read_text() == '{"x": 2.0}' and not list(path.parent.glob("*.tmp"))
