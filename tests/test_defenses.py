"""Post-hoc LoRA defenses do what they say; DP-SGD fine-tuning clips, noises, accounts and trains."""

import copy
import itertools
import math
from dataclasses import replace

import pytest
import torch

from core.defenses.dp import (
    DPConfig,
    clipped_per_sample_grads,
    dp_finetune,
    per_sample_grads,
    private_gradient,
    resolve_noise_multiplier,
)
from core.defenses.posthoc import DEFENSES, apply_defense, prune, quantize, rank_truncate, weight_noise
from core.events import Checkpoint, Done, Preview, Progress, drain
from core.finetune.batch import adapter_unet
from core.finetune.lora import FinetuneConfig, finetune, lora_config, lora_state_dict
from core.model.denoising import Denoiser
from tests.conftest import random_crops

TINY = FinetuneConfig(steps=2, checkpoint_every=0, preview_n=0, n_class=4, batch=2)


@pytest.fixture(scope="module")
def lora(tiny_pipe):
    """A real (briefly trained) LoRA of the tiny pipeline: linear and conv factors, B non-zero."""
    sd = drain(finetune(tiny_pipe, random_crops(3), TINY)).lora
    assert any(v.dim() == 4 for v in sd.values()) and all((v != 0).all() for v in sd.values())
    return sd


def modules(sd):
    return sorted(k[: -len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight"))


def close(got, want, rel=1e-4):
    """Equal up to float32 rounding, relative to the tensor's scale."""
    return float((got - want).abs().max()) <= rel * float(want.abs().max()) + 1e-9


def product(sd, m):
    a, b = sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"]
    return b.reshape(b.shape[0], -1).double() @ a.reshape(a.shape[0], -1).double()


# post-hoc defenses -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_registry_defenses_are_pure(lora, name):
    fn, strengths, label = DEFENSES[name]
    assert len(strengths) >= 4 and isinstance(label, str) and label
    before = {k: v.clone() for k, v in lora.items()}
    for s in strengths:
        out = fn(lora, s)
        assert out.keys() == lora.keys()
        for k, v in out.items():
            assert v.shape == lora[k].shape and v.dtype == torch.float32 and v.data_ptr() != lora[k].data_ptr()
        assert any(not torch.equal(out[k], lora[k]) for k in lora)
        again = apply_defense(lora, name, s)
        assert all(torch.equal(again[k], out[k]) for k in lora)  # deterministic (noise: seed 0)
    assert all(torch.equal(before[k], lora[k]) for k in lora)  # input untouched


def test_weight_noise_has_relative_std_sigma_and_is_seeded(lora):
    sigma = 0.3
    out = weight_noise(lora, sigma, seed=1)
    z = torch.cat([((out[k] - v) / v.pow(2).mean().sqrt()).flatten() for k, v in lora.items()])
    assert z.numel() > 20_000 and abs(float(z.std()) / sigma - 1) < 0.03 and abs(float(z.mean())) < 0.03
    for k, v in lora.items():  # per tensor too, where the tensor is large enough to measure
        if v.numel() >= 2000:
            rel = (out[k] - v).std() / v.pow(2).mean().sqrt()
            assert abs(float(rel) / sigma - 1) < 0.1, k
    again, other = weight_noise(lora, sigma, seed=1), weight_noise(lora, sigma, seed=2)
    assert all(torch.equal(again[k], out[k]) for k in lora)
    assert all(not torch.equal(other[k], out[k]) for k in lora)
    assert all(torch.equal(v, lora[k]) for k, v in weight_noise(lora, 0.0).items())


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9, 0.99])
def test_prune_zeroes_the_stated_fraction_of_smallest_entries(lora, fraction):
    out = prune(lora, fraction)
    for k, v in lora.items():
        zero = out[k] == 0
        assert int(zero.sum()) == round(fraction * v.numel()), k  # exactly that many (none were 0 before)
        assert torch.equal(out[k][~zero], v[~zero])  # survivors unchanged
        if zero.any() and (~zero).any():
            assert v[zero].abs().max() <= v[~zero].abs().min()  # the smallest magnitudes went


@pytest.mark.parametrize("bits, levels", [(8, 255), (4, 15), (2, 3)])
def test_quantize_symmetric_per_tensor_levels(lora, bits, levels):
    out = quantize(lora, bits)
    qmax = 2 ** (bits - 1) - 1
    most = 0
    for k, v in lora.items():
        scale = v.abs().max() / qmax
        q = out[k] / scale
        assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= qmax + 1e-3  # integers -qmax..qmax
        assert (out[k] - v).abs().max() <= scale / 2 * (1 + 1e-5)  # round to nearest
        n = len(torch.unique(out[k]))
        assert n <= levels, (k, n)
        most = max(most, n)
    if bits <= 4:
        assert most == levels  # the large tensors use every level of the symmetric grid


@pytest.mark.parametrize("keep", [1, 2, 3, 4])
def test_rank_truncate_is_the_svd_truncation_of_ba(lora, keep):
    r = lora[f"{modules(lora)[0]}.lora_A.weight"].shape[0]
    padded, shrunk = rank_truncate(lora, keep), rank_truncate(lora, keep, pad=False)
    for m in modules(lora):
        a, b = lora[f"{m}.lora_A.weight"], lora[f"{m}.lora_B.weight"]
        u, s, vh = torch.linalg.svd(product(lora, m), full_matrices=False)
        best = (u[:, :keep] * s[:keep]) @ vh[:keep]  # Eckart-Young: the best rank-keep approximation
        for sd, rank in ((padded, r), (shrunk, min(keep, r))):
            a2, b2 = sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"]
            assert a2.shape == (rank, *a.shape[1:]) and b2.shape == (b.shape[0], rank, *b.shape[2:])
            got = product(sd, m)
            assert torch.allclose(got, best, atol=1e-5 * float(s[0]), rtol=1e-4), m
            assert torch.linalg.matrix_rank(got, rtol=1e-5) <= keep
    if keep >= r:  # full rank: the update is unchanged, only its factorisation is canonical
        assert all(torch.allclose(product(padded, m), product(lora, m), atol=1e-6) for m in modules(lora))


def test_defenses_refuse_bad_strengths(lora):
    for call in (
        lambda: weight_noise(lora, -1),
        lambda: prune(lora, 1.5),
        lambda: quantize(lora, 1),
        lambda: quantize(lora, 4.5),
        lambda: rank_truncate(lora, 0),
    ):
        with pytest.raises(ValueError):
            call()


# DP-SGD ----------------------------------------------------------------------------------------


def initial_lora(pipe, cfg):
    """The LoRA finetune starts from with cfg.seed (seeded peft initialisation)."""
    torch.manual_seed(cfg.seed)
    u = copy.deepcopy(pipe.unet).requires_grad_(False)
    u.add_adapter(lora_config(cfg))
    return lora_state_dict(u)


def test_dp_finetune_trains_and_reports_the_accountants_epsilon(tiny_pipe):
    from opacus.accountants import RDPAccountant

    cfg = replace(TINY, steps=4, checkpoint_every=2, preview_n=1, preview_steps=2)
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=0.5)
    events = list(dp_finetune(tiny_pipe, random_crops(4), cfg, dp))
    res = events[-1].result
    assert isinstance(events[-1], Done) and not events[-1].cancelled and res.steps_done == 4
    kinds = [type(e) for e in events]
    assert kinds.count(Progress) == 4 and kinds.count(Checkpoint) == 2 and kinds.count(Preview) == 2
    ckpt = [e for e in events if isinstance(e, Checkpoint)][-1]
    assert all(torch.equal(ckpt.lora[k], res.lora[k]) for k in res.lora)
    eps = [e.metrics["epsilon"] for e in events if isinstance(e, Progress)]
    acc, want = RDPAccountant(), []
    for _ in eps:
        acc.step(noise_multiplier=1.0, sample_rate=2 / 4)
        want.append(acc.get_epsilon(delta=dp.delta))
    assert (
        eps == pytest.approx(want, rel=1e-9)
        and all(b > a for a, b in itertools.pairwise(eps))
        and eps[-1] == res.epsilon
    )
    assert res.sample_rate == 0.5 and res.noise_multiplier == 1.0
    init = initial_lora(tiny_pipe, cfg)
    assert res.lora.keys() == init.keys()
    assert all(not torch.equal(res.lora[k], v) for k, v in init.items())  # every LoRA tensor moved


def test_dp_signal_alone_moves_the_weights(tiny_pipe):
    """No noise, no class images: any change comes from the photos' clipped per-sample gradients
    (the silent failure of Opacus + peft is a LoRA that never changes)."""
    cfg = replace(TINY, steps=3, prior_weight=0.0)
    res = drain(dp_finetune(tiny_pipe, random_crops(4), cfg, DPConfig(noise_multiplier=0.0, max_grad_norm=1.0)))
    init = initial_lora(tiny_pipe, cfg)
    assert all(not torch.equal(res.lora[k], v) for k, v in init.items())
    assert all((res.lora[k] != 0).any() for k in init if k.endswith("lora_B.weight"))  # B left its zero init
    assert math.isinf(res.epsilon)  # no noise, no privacy


def test_target_epsilon_sets_the_noise(tiny_pipe):
    from opacus.accountants import RDPAccountant

    dp = DPConfig(target_epsilon=8.0)
    res = drain(dp_finetune(tiny_pipe, random_crops(4), replace(TINY, steps=2), dp))
    assert res.noise_multiplier == resolve_noise_multiplier(dp, 0.5, 2) > 0
    acc = RDPAccountant()
    acc.history = [(res.noise_multiplier, 0.5, 2)]
    assert res.epsilon == pytest.approx(acc.get_epsilon(delta=dp.delta), rel=1e-9)
    assert 8.0 - 0.05 < res.epsilon <= 8.0  # the run ends at the target


def test_dp_refuses_what_it_cannot_account(tiny_pipe):
    for bad in ({"noise_multiplier": -1}, {"max_grad_norm": 0}, {"delta": 1.0}, {"target_epsilon": 0}):
        with pytest.raises(ValueError):
            DPConfig(**bad)
    with pytest.raises(ValueError, match="batch"):
        next(dp_finetune(tiny_pipe, random_crops(3), replace(TINY, batch=4)))
    with pytest.raises(ValueError, match="text_encoder"):
        next(dp_finetune(tiny_pipe, random_crops(3), replace(TINY, text_encoder=True)))


def test_cancel_between_steps(tiny_pipe):
    seen = []
    for e in dp_finetune(tiny_pipe, random_crops(3), replace(TINY, steps=20), should_stop=lambda: len(seen) >= 2):
        if isinstance(e, Progress):
            seen.append(e)
    assert isinstance(e, Done) and e.cancelled and e.result.steps_done == 2 and len(seen) == 2


@pytest.fixture(scope="module")
def dp_setup(tiny_pipe):
    """The functional UNet, LoRA weights with B made non-zero (so A has gradients too), a noised
    batch of 3 photo latents and 2 class latents, and the prompt embeddings."""
    from core.finetune.lora import encode_prompt

    cfg = TINY
    unet = adapter_unet(tiny_pipe, cfg)
    torch.manual_seed(0)
    params = {n: (p.detach().clone() + 0.05 * torch.randn_like(p)) for n, p in unet.named_parameters() if "lora_" in n}
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 4, 4, generator=g)
    batch = Denoiser(tiny_pipe.scheduler.config).noise(x0, g, t=torch.tensor([10, 300, 600, 200, 900]))
    inst, cls = batch[:3], batch[3:]
    with torch.no_grad():
        emb_inst, emb_cls = (
            encode_prompt(tiny_pipe, "a photo of zorp face"),
            encode_prompt(tiny_pipe, "a photo of a face"),
        )
    return cfg, unet, params, inst, cls, emb_inst, emb_cls


def test_per_sample_grads_are_clipped_to_max_grad_norm(dp_setup):
    _, unet, params, inst, _, emb, _ = dp_setup
    raw, _ = per_sample_grads(unet, params, inst, emb)
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in raw.values()]).sum(0).sqrt()
    assert (norms > 0).all()
    c = 0.5 * float(norms.min())
    clipped = clipped_per_sample_grads(unet, params, inst, emb, c)
    after = torch.stack([g.flatten(1).pow(2).sum(1) for g in clipped.values()]).sum(0).sqrt()
    assert (after <= c).all() and torch.allclose(after, torch.full_like(after, c), rtol=1e-4)
    loose = clipped_per_sample_grads(unet, params, inst, emb, 1e6)  # above every norm: untouched
    assert all(close(loose[n], raw[n], 1e-6) for n in raw)
    # sample i's gradient is the gradient of sample i's loss alone
    one = inst[1:2]
    single, _ = per_sample_grads(unet, params, one, emb)
    assert all(close(single[n][0], raw[n][1]) for n in raw)


def test_no_noise_and_no_clipping_is_plain_gradient_descent(tiny_pipe, dp_setup):
    cfg, unet, params, inst, cls, emb_inst, emb_cls = dp_setup
    expected, lr = 2, 0.1
    g_dp, stats = private_gradient(
        unet,
        params,
        inst,
        emb_inst,
        cls,
        emb_cls,
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        expected_batch=expected,
        prior_weight=cfg.prior_weight,
        generator=torch.Generator().manual_seed(0),
    )
    # the ordinary way: a peft UNet (default attention), one forward on the whole batch, backward, SGD
    ref = copy.deepcopy(tiny_pipe.unet).requires_grad_(False)
    ref.add_adapter(lora_config(cfg))
    named = dict(ref.named_parameters())
    with torch.no_grad():
        for n, v in params.items():
            named[n].copy_(v)
    opt = torch.optim.SGD([named[n] for n in params], lr=lr)
    xt, t, target = (torch.cat([getattr(inst, k), getattr(cls, k)]) for k in ("noisy", "t", "target"))
    emb = torch.cat([emb_inst.expand(len(inst), -1, -1), emb_cls.expand(len(cls), -1, -1)])
    err = (ref(xt, t, emb).sample - target).pow(2).mean(dim=(1, 2, 3))
    loss = err[: len(inst)].sum() / expected + cfg.prior_weight * err[len(inst) :].mean()
    loss.backward()
    opt.step()
    assert stats["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    for n, v in params.items():
        assert close(g_dp[n], named[n].grad), n
        assert close(v - lr * g_dp[n], named[n].detach(), 1e-6), n
