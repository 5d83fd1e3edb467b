"""Per-sample gradient clipping, shared by DP-SGD (one gradient per photo) and the shadow trainer
(one gradient per LoRA trained in the same batched forward)."""

from __future__ import annotations

import torch


def clip_per_sample(grads: dict, max_grad_norm: float) -> tuple[dict, torch.Tensor]:
    """Scale each sample's gradient (all tensors together) to L2 norm <= C, as Opacus does:
    factor min(1, C / (norm + 1e-6)). Returns (clipped grads, norms before clipping)."""
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    coef = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return {n: g * coef.view(-1, *[1] * (g.dim() - 1)) for n, g in grads.items()}, norms
