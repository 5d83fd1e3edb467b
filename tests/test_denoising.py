"""core.model.denoising: targets from diffusers' scheduler, min-SNR weights, masked errors."""

import pytest
import torch

from core.model.denoising import Denoiser


@pytest.fixture(params=["epsilon", "v_prediction"])
def den(request):
    from diffusers import DDPMScheduler

    return Denoiser(DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=request.param).config, 5.0)


def test_target_inverts_to_the_clean_latents(den):
    """x0 recovered from (noisy, target) by the scheduler's own formulas equals the input."""
    x0 = torch.randn(6, 4, 8, 8)
    b = den.noise(x0, torch.Generator().manual_seed(0), t=torch.tensor([0, 10, 200, 500, 900, 999]))
    ab = den.sched.alphas_cumprod[b.t].view(-1, 1, 1, 1)
    if den.prediction == "epsilon":
        rec = (b.noisy - (1 - ab).sqrt() * b.target) / ab.sqrt()
        keep = b.t < 900  # at alpha_bar ~ 0 an epsilon target cannot give x0 back
    else:
        rec = ab.sqrt() * b.noisy - (1 - ab).sqrt() * b.target
        keep = torch.ones(6, dtype=torch.bool)
    assert torch.allclose(rec[keep], x0[keep], atol=1e-3)


def test_min_snr_weights(den):
    snr = den.sched.alphas_cumprod / (1 - den.sched.alphas_cumprod)
    w = den.weights
    i = int(torch.argmin((snr - 5).abs()))
    assert w[0] == pytest.approx(5 / (snr[0] + (1 if den.prediction == "v_prediction" else 0)).item(), rel=1e-4)
    assert w[-1] == pytest.approx(
        (snr[-1] / (snr[-1] + 1)).item() if den.prediction == "v_prediction" else 1.0, rel=1e-3
    )
    assert 0 < w[i] <= 1.0 + 1e-6


def test_mask_ignores_pixels_outside_the_photo(den):
    x0 = torch.randn(2, 4, 8, 8)
    b = den.noise(x0, torch.Generator().manual_seed(1))
    pred = b.target.clone()
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :2] = 0  # the top rows came from mirrored padding
    pred[:, :, :2] += 10.0  # wrong only there
    assert torch.allclose(den.errors(pred, b, mask), torch.zeros(2), atol=1e-6)
    assert (den.errors(pred, b) > 1).all()


def test_slicing_a_batch_keeps_rows_together(den):
    b = den.noise(torch.randn(5, 4, 8, 8), torch.Generator().manual_seed(2))
    part = b[1:3]
    assert len(part) == 2 and torch.equal(part.t, b.t[1:3]) and torch.equal(part.target, b.target[1:3])
