"""The attacker reads a LoRA through B A only, trains on shadow LoRAs, and reconstructs."""

import numpy as np
import torch

from core.attack.attacker import (
    AttackerConfig,
    canonical_factors,
    load_attacker,
    lora_inputs,
    reconstruct,
    save_attacker,
)
from core.attack.shadow import ShadowJob, build_population, list_shadows
from core.attack.train import TrainConfig, train
from core.events import Done, drain
from core.finetune.lora import FinetuneConfig
from tests.conftest import random_crops


def test_canonical_factors_depend_on_the_product_only():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(3, 20, 4, generator=g), torch.randn(3, 4, 36, generator=g)
    m = torch.randn(3, 4, 4, generator=g) + 3 * torch.eye(4)
    u1, v1 = canonical_factors(b, a, 0.5)
    u2, v2 = canonical_factors(b @ m, torch.linalg.solve(m, a), 0.5)
    torch.testing.assert_close(u1, u2, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(v1, v2, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(u1 @ v1.transpose(-1, -2), 0.5 * b @ a, rtol=1e-4, atol=1e-4)


def test_only_canonical_inputs_ignore_how_a_lora_was_factored():
    """The ablation's two input forms: the same update dW = B A factored two ways reaches the
    encoder identically through canonical inputs, differently through raw B and A."""
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(20, 4, generator=g), torch.randn(4, 36, generator=g)
    m = torch.randn(4, 4, generator=g) + 3 * torch.eye(4)
    lo1 = {"unet.x.lora_A.weight": a, "unet.x.lora_B.weight": b}
    lo2 = {"unet.x.lora_A.weight": torch.linalg.solve(m, a), "unet.x.lora_B.weight": b @ m}
    for form, same in (("canonical", True), ("raw", False)):
        cfg = AttackerConfig(modules=["x"], shapes=[(20, 36)], inputs=form)
        ((u, v),) = lora_inputs([lo1, lo2], cfg)
        assert u.shape == (2, 4, 20) and v.shape == (2, 4, 36)
        assert torch.allclose(u[0], u[1], atol=1e-4) == same and torch.allclose(v[0], v[1], atol=1e-4) == same


def test_attacker_trains_on_shadows_and_reconstructs(tiny_pipe, tmp_path):
    from PIL import Image

    root = tmp_path / "lfw"
    jobs = []
    for i in range(4):
        (root / f"P{i}").mkdir(parents=True)
        for j in range(3):
            Image.fromarray(random_crops(1, 250)[0]).save(root / f"P{i}" / f"{j}.jpg")
        jobs.append(ShadowJob(f"P{i}", [f"{j}.jpg" for j in range(3)], seed=i))
    cfg = FinetuneConfig(steps=4, checkpoint_every=0, preview_n=0, n_class=4, batch=2)
    drain(build_population(tiny_pipe, jobs, cfg, tmp_path / "shadow", group=4, record_every=2, root=root))
    tcfg = TrainConfig(
        steps=3, loras_per_step=2, latents_per_lora=2, holdout=1, eval_every=3, warmup=1, min_step=2, width=32, layers=1
    )
    events = list(train(tiny_pipe, list_shadows(tmp_path / "shadow"), tcfg))
    assert isinstance(events[-1], Done) and not events[-1].cancelled
    model, log = events[-1].result.model, events[-1].result.log
    assert len(log["train"]) == 3 and all(np.isfinite(r[1]) for r in log["train"])
    assert set(log["eval"][-1]) >= {"attacker", "class prompt", "true trigger"}
    path = save_attacker(model, tmp_path / "att.safetensors", {"note": "test"})
    again, info = load_attacker(path)
    assert info == {"note": "test"}
    from core.attack.shadow import load_shadow

    lora = load_shadow(list_shadows(tmp_path / "shadow")[0]).checkpoints[4]
    ims, z = reconstruct(tiny_pipe, again, lora, 4, seeds=(0, 1), steps=2)
    assert len(ims) == 2 and ims[0].shape == (64, 64, 3) and z.shape == model.class_embedding.shape
    torch.testing.assert_close(
        again.encode([lora], [4]), model.encode([lora], [4]), rtol=1e-2, atol=1e-2
    )  # stored in float16


def test_training_can_be_cancelled(tiny_pipe, tmp_path):
    from PIL import Image

    from core.attack.shadow import build_population

    root = tmp_path / "lfw"
    jobs = []
    for i in range(3):
        (root / f"P{i}").mkdir(parents=True)
        for j in range(3):
            Image.fromarray(random_crops(1, 250)[0]).save(root / f"P{i}" / f"{j}.jpg")
        jobs.append(ShadowJob(f"P{i}", [f"{j}.jpg" for j in range(3)], seed=i))
    cfg = FinetuneConfig(steps=2, checkpoint_every=0, preview_n=0, n_class=2, batch=1)
    drain(build_population(tiny_pipe, jobs, cfg, tmp_path / "shadow", group=3, record_every=1, root=root))
    tcfg = TrainConfig(
        steps=10,
        loras_per_step=1,
        latents_per_lora=1,
        holdout=1,
        eval_every=0,
        warmup=1,
        min_step=1,
        width=32,
        layers=1,
    )
    n = []
    events = list(
        train(tiny_pipe, list_shadows(tmp_path / "shadow"), tcfg, should_stop=lambda: len(n) > 2 or n.append(1))
    )
    assert isinstance(events[-1], Done) and events[-1].cancelled and events[-1].result.log["steps_done"] < 10


def test_learning_rate_schedule_follows_the_shortened_horizon():
    from core.attack.train import lr_at

    cfg = TrainConfig(steps=1000, warmup=10, lr=1.0)
    assert lr_at(4, cfg) == lr_at(4, cfg, 100) == 0.5  # warm-up does not depend on the horizon
    assert lr_at(99, cfg, 100) < 0.01 < lr_at(99, cfg)  # decays to ~0 at the horizon it is given
    assert lr_at(500, cfg, 100) == 0.0  # and stays there
