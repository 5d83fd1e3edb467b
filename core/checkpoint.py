"""Resumable training state in safetensors (never pickle): model weights + AdamW moments + step."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_training_state(
    path: str | Path, modules: dict, optimizer: torch.optim.Optimizer, step: int, extra: dict | None = None
) -> None:
    """Write ``{name}.{param}`` weights and ``opt.{i}.{key}`` optimizer moments to one safetensors file."""
    tensors = {}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().contiguous().cpu()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for k, v in optimizer.state.get(p, {}).items():
            if torch.is_tensor(v):
                tensors[f"opt.{i}.{k}"] = v.detach().contiguous().cpu().reshape(v.shape)
    meta = {"step": str(step), "extra": json.dumps(extra or {})}
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, tmp, metadata=meta)
    tmp.replace(path)


def load_training_state(path: str | Path, modules: dict, optimizer: torch.optim.Optimizer | None) -> tuple[int, dict]:
    """Restore what :func:`save_training_state` wrote; returns (step, extra)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    for name, m in modules.items():
        pre = f"{name}."
        m.load_state_dict({k[len(pre) :]: v for k, v in tensors.items() if k.startswith(pre)})
    if optimizer is not None:
        # through load_state_dict, which moves each moment to its parameter's device and dtype
        # (assigning CPU tensors into optimizer.state breaks AdamW's foreach path on CUDA)
        sd = optimizer.state_dict()
        state = {}
        for i in range(sum(len(g["params"]) for g in optimizer.param_groups)):
            pre = f"opt.{i}."
            st = {k[len(pre) :]: v for k, v in tensors.items() if k.startswith(pre)}
            if st:
                state[i] = st
        optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    return int(meta["step"]), json.loads(meta.get("extra", "{}"))
