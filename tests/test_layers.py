"""Busy / lazy layers (core.layers.change), their figures and the Layers tab's functions, on the tiny pipeline."""

import numpy as np
import pytest
import torch

from core.events import Checkpoint, drain
from core.finetune.full import full_finetune
from core.finetune.lora import FinetuneConfig, finetune, pipeline_with_lora
from core.layers.change import (
    base_state,
    block_group,
    forward_order,
    full_layer_change,
    layer_kind,
    lora_layer_change,
    lora_modules,
    rank_layers,
    trajectory_changes,
    vector_change,
)
from core.layers.swap import full_keep_top_k, iter_full_swap_curve, iter_swap_curve, keep_top_k, resolve_ks
from tests.conftest import random_crops

TINY = dict(steps=3, checkpoint_every=1, n_class=4, batch=2, preview_n=0)


@pytest.fixture(scope="module")
def run(tiny_pipe):
    """A tiny LoRA fine-tune: (result, {step: LoRA})."""
    ckpts = {}
    res = drain(
        finetune(tiny_pipe, random_crops(3), FinetuneConfig(**TINY)),
        lambda ev: ckpts.__setitem__(ev.step, ev.lora) if isinstance(ev, Checkpoint) else None,
    )
    return res, ckpts


def unet_state(pipe):
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


def planted(lora, scale_of=None, zero=False):
    """The LoRA with every B set to zero (zero=True) or small, and selected modules' B scaled."""
    out = {}
    for k, v in lora.items():
        if k.endswith("lora_B.weight"):
            v = torch.zeros_like(v) if zero else torch.full_like(v, 1e-4)
            name = k[len("unet.") : -len(".lora_B.weight")]
            if scale_of and name in scale_of:
                v = torch.full_like(v, scale_of[name])
        out[k] = v.clone()
    return out


def test_heatmap_data_match_the_lora_layers(tiny_pipe, run):
    from core.finetune.lora import UNET_TARGETS
    from core.plots import layer_heatmap

    res, ckpts = run
    expected = {
        n
        for n, m in tiny_pipe.unet.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n.endswith(UNET_TARGETS)
    }
    assert set(lora_modules(res.lora)) == expected
    t = trajectory_changes(tiny_pipe, ckpts, alpha=res.config.alpha)
    assert t.matrix.shape == (len(expected), 3) and t.steps == [1, 2, 3]
    assert set(t.names) == expected and t.names == forward_order(t.names)
    assert t.groups == [block_group(n) for n in t.names] and np.all(np.isfinite(t.matrix)) and np.all(t.matrix > 0)
    final = [c.relative for c in lora_layer_change(tiny_pipe, res.lora, res.config.alpha)]
    assert np.allclose(t.matrix[:, -1], final)  # the last checkpoint is the final LoRA
    fig = layer_heatmap(t.matrix, t.names, t.steps, t.groups)
    hm = fig.data[0]
    assert np.asarray(hm.z).shape == (3, len(expected))  # steps x layers
    assert [c[0] for c in np.asarray(hm.customdata)[0]] == t.names


def test_forward_order_and_names():
    names = [
        "up_blocks.0.resnets.0.conv1",
        "mid_block.resnets.1.conv1",
        "mid_block.attentions.0.proj_in",
        "down_blocks.1.downsamplers.0.conv",
        "down_blocks.1.resnets.0.conv2",
        "conv_out",
        "mid_block.resnets.0.conv1",
        "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
        "conv_in",
    ]
    assert forward_order(names) == [
        "conv_in",
        "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
        "down_blocks.1.resnets.0.conv2",
        "down_blocks.1.downsamplers.0.conv",
        "mid_block.resnets.0.conv1",
        "mid_block.attentions.0.proj_in",
        "mid_block.resnets.1.conv1",
        "up_blocks.0.resnets.0.conv1",
        "conv_out",
    ]
    assert (
        block_group("down_blocks.1.attentions.0.proj_in") == "down_blocks.1"
        and block_group("mid_block.resnets.0.conv1") == "mid_block"
    )
    assert [
        layer_kind(n)
        for n in (
            "a.attn1.to_q",
            "a.attn2.to_v",
            "a.ff.net.2",
            "x.proj_out",
            "down_blocks.0.resnets.0.conv2",
            "down_blocks.0.resnets.0.time_emb_proj",
            "up_blocks.0.upsamplers.0.conv",
            "conv_in",
        )
    ] == ["attn1", "attn2", "ff", "proj", "conv", "time", "resample", "io"]
    assert resolve_ks([1, 3, None, 500, 3, 0], 40) == [0, 1, 3, 40]


def test_zero_lora_has_no_change(tiny_pipe, run):
    changes = lora_layer_change(tiny_pipe, planted(run[0].lora, zero=True))
    assert changes and all(c.relative == 0.0 and c.moved == 0.0 and c.delta_norm == 0.0 for c in changes)


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_planted_change_matches_a_hand_computation(tiny_pipe, run, alpha):
    from core.layers.change import TAU

    lora = planted(run[0].lora, zero=True)
    mods = dict(tiny_pipe.unet.named_modules())
    conv = next(n for n in lora_modules(lora) if isinstance(mods[n], torch.nn.Conv2d) and mods[n].kernel_size == (3, 3))
    lin = next(n for n in lora_modules(lora) if isinstance(mods[n], torch.nn.Linear))
    g = torch.Generator().manual_seed(0)
    for n in (conv, lin):
        a, b = lora[f"unet.{n}.lora_A.weight"], lora[f"unet.{n}.lora_B.weight"]
        lora[f"unet.{n}.lora_A.weight"] = torch.randn(a.shape, generator=g)
        lora[f"unet.{n}.lora_B.weight"] = 0.01 * torch.randn(b.shape, generator=g)
    got = {c.name: c for c in lora_layer_change(tiny_pipe, lora, alpha)}
    for n in (conv, lin):
        a, b = lora[f"unet.{n}.lora_A.weight"], lora[f"unet.{n}.lora_B.weight"]
        r = a.shape[0]
        w0 = mods[n].weight.detach().double()
        dw = ((alpha or r) / r) * torch.einsum(
            "or,rk->ok", b.double().reshape(b.shape[0], r), a.double().reshape(r, -1)
        )
        dw = dw.reshape(w0.shape)
        assert got[n].relative == pytest.approx(float(dw.norm() / w0.norm()), rel=1e-5)
        assert got[n].moved == pytest.approx(float((dw.abs() > TAU * w0.abs().mean()).double().mean()), abs=1e-3)
        assert got[n].numel == w0.numel() and got[n].relative > 0
    # the hand dW is the one pipeline_with_lora merges
    merged = pipeline_with_lora(tiny_pipe, {k: v for k, v in lora.items() if conv in k}, alpha).unet
    delta = dict(merged.named_modules())[conv].weight.detach() - mods[conv].weight.detach()
    assert float(delta.norm() / mods[conv].weight.detach().norm()) == pytest.approx(got[conv].relative, rel=1e-4)
    assert got[next(iter(set(got) - {conv, lin}))].relative == 0.0


def test_ranking_puts_a_planted_big_change_first(tiny_pipe, run):
    names = lora_modules(run[0].lora)
    big, mid = names[len(names) // 2], names[0]
    lora = planted(run[0].lora, {big: 0.5, mid: 0.05})
    lora[f"unet.{names[-1]}.lora_B.weight"].zero_()
    busy, lazy = rank_layers(lora_layer_change(tiny_pipe, lora))
    assert busy[0].name == big and busy[1].name == mid and lazy[0].name == names[-1] and lazy[0].relative == 0.0
    assert [c.name for c in lazy] == [c.name for c in busy][::-1] and len(busy) == len(names)
    assert len(rank_layers(lora_layer_change(tiny_pipe, lora), 3)[0]) == 3


def test_keeping_all_layers_is_the_lora_and_none_is_the_base(tiny_pipe, run):
    res = run[0]
    ranking = rank_layers(lora_layer_change(tiny_pipe, res.lora, res.config.alpha))[0]
    n = len(ranking)
    full = unet_state(pipeline_with_lora(tiny_pipe, res.lora, res.config.alpha))
    every = unet_state(pipeline_with_lora(tiny_pipe, keep_top_k(res.lora, ranking, n), res.config.alpha))
    none = unet_state(pipeline_with_lora(tiny_pipe, keep_top_k(res.lora, ranking, 0), res.config.alpha))
    base = unet_state(tiny_pipe)
    assert all(torch.equal(every[k], full[k]) for k in full)
    assert all(torch.equal(none[k], base[k]) for k in base) and keep_top_k(res.lora, ranking, 0) == {}
    three = unet_state(pipeline_with_lora(tiny_pipe, keep_top_k(res.lora, ranking, 3), res.config.alpha))
    changed = {k[: -len(".weight")] for k in base if not torch.equal(three[k], base[k])}
    assert changed == {c.name for c in ranking[:3]}


def test_swap_curve_rows(tiny_pipe, run):
    from core.faces.utility import lora_utility

    res, _ = run
    photos = random_crops(3)
    rows = list(
        iter_swap_curve(tiny_pipe, res.lora, res.trigger, photos, ks=(1, None, 500), alpha=res.config.alpha, steps=2)
    )
    n = len(lora_modules(res.lora))
    assert [r.k for r in rows] == [1, n] and all(r.n_layers == n for r in rows)
    assert len({r.floor for r in rows}) == 1 and all(np.isfinite(r.distance) for r in rows)
    whole = lora_utility(tiny_pipe, res.lora, res.trigger, photos, alpha=res.config.alpha, steps=2)
    assert rows[-1].distance == pytest.approx(whole.distance, abs=1e-5) and rows[-1].floor == pytest.approx(
        whole.floor, abs=1e-6
    )


def test_full_finetune_and_full_layer_change(tiny_pipe):
    from core.plots import swap_curve_plot

    base = unet_state(tiny_pipe)
    res = drain(full_finetune(tiny_pipe, random_crops(3), steps=2, lr=1e-3, n_class=4, checkpoint_every=1))
    assert res.steps_done == 2 and len(res.losses) == 2 and all(np.isfinite(res.losses))
    assert all(torch.equal(base[k], v) for k, v in tiny_pipe.unet.state_dict().items())  # base untouched
    w0 = base_state(tiny_pipe)
    assert set(res.state) == set(w0) and any(not torch.equal(w0[k], res.state[k]) for k in w0)
    changes = full_layer_change(w0, res.state)
    weights = {k[: -len(".weight")] for k, v in w0.items() if k.endswith(".weight") and v.dim() >= 2}
    assert {c.name for c in changes} == weights and len(changes) == len(weights)
    assert all(c.relative > 0 for c in changes) and sorted(res.trajectory) == [1, 2]
    assert set(vector_change(w0, res.state)) == {"bias", "norm"}
    ranking = rank_layers(changes)[0]
    every, none = full_keep_top_k(w0, res.state, ranking, len(ranking)), full_keep_top_k(w0, res.state, ranking, 0)
    assert all(torch.equal(none[k], w0[k]) for k in w0)
    assert all(torch.equal(every[k], res.state[k]) for k in w0 if "norm" not in k)
    rows = list(
        iter_full_swap_curve(tiny_pipe, res.state, res.trigger, random_crops(3), ks=(1, None), changes=changes, steps=2)
    )
    assert [r.k for r in rows] == [1, len(changes)] and all(np.isfinite(r.distance) for r in rows)
    fig = swap_curve_plot(rows)
    assert list(fig.data[0].x) == [1, len(changes)]


# the Layers tab's functions ---------------------------------------------------------------------


class TinyEngine:
    def __init__(self, pipe):
        self.pipe = pipe

    def floor_images(self):
        from core.faces.utility import floor_images

        return floor_images(self.pipe, steps=2)


def test_layers_tab_without_and_with_a_finetune(tiny_pipe, run):
    import gradio as gr

    from ui.layers_tab import NO_FINETUNE, layers_view, swap_run
    from ui.session import VisitorSession

    engine = TinyEngine(tiny_pipe)
    assert layers_view(engine, None) == (NO_FINETUNE, None, "")
    with pytest.raises(gr.Error):
        next(swap_run(engine, VisitorSession()))
    res, ckpts = run
    session = VisitorSession(result=res, trained_on=random_crops(3))
    try:
        status, fig, table = layers_view(engine, session)
        n = len(lora_modules(res.lora))
        assert f"{n} layers" in status and np.asarray(fig.data[0].z).shape == (1, n)
        assert "Busiest" in table and "Laziest" in table and "‖ΔW‖ / ‖W‖" in table
        for step, lora in sorted(ckpts.items()):  # what the Fine-tune tab keeps of the live job's LayerChanges
            session.layer_steps[step] = lora_layer_change(tiny_pipe, lora, res.config.alpha)
        status, fig, _ = layers_view(engine, session)
        assert np.asarray(fig.data[0].z).shape == (3, n) and "1, 2, 3" in status
        outs = list(swap_run(engine, session, ks=(None,), steps=2))
        assert (
            len(outs) == 2
            and outs[0][1] is None
            and "1 of 1 points" in outs[-1][0]
            and "your whole LoRA" in outs[-1][0]
        )
        assert list(outs[-1][1].data[0].x) == [n]
    finally:
        session.close()
