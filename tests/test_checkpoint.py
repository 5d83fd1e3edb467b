"""core.checkpoint: training state round-trips through safetensors, and optimizer moments are
restored through ``load_state_dict`` (so they follow their parameter's device and dtype)."""

import torch

from core.checkpoint import load_training_state, save_training_state


def _trained(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4, dtype=dtype)).pow(2).sum().backward()
        opt.step()
    return model, opt


def test_round_trip_continues_identically(tmp_path):
    model, opt = _trained()
    save_training_state(tmp_path / "s.safetensors", {"m": model}, opt, 3, {"note": "x"})
    m2 = torch.nn.Linear(4, 3)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    step, extra = load_training_state(tmp_path / "s.safetensors", {"m": m2}, o2)
    assert step == 3 and extra == {"note": "x"}
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (m2, o2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m2.parameters()))


def test_moments_follow_the_parameters_dtype_and_device(tmp_path):
    """Saved from float32, restored into a float64 model: the moments become float64 (as they would move
    to CUDA for a CUDA model); assigning the saved tensors as they are broke AdamW's foreach path."""
    model, opt = _trained()
    save_training_state(tmp_path / "s.safetensors", {"m": model}, opt, 3)
    m2 = torch.nn.Linear(4, 3).double()
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, foreach=True)
    load_training_state(tmp_path / "s.safetensors", {"m": m2}, o2)
    for p in m2.parameters():
        assert o2.state[p]["exp_avg"].dtype == torch.float64 and o2.state[p]["exp_avg"].device == p.device
    o2.zero_grad()
    m2(torch.randn(5, 4, dtype=torch.float64)).pow(2).sum().backward()
    o2.step()  # runs
