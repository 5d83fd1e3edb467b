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
