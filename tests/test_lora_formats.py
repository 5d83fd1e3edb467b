"""LoRA files in the formats people share (core.finetune.formats through core.finetune.lora_file), on the tiny
SD 1.x-layout pipeline: every readable file reads to the merge and the layer list computed here from
the tensors the file was written from (tests/sd1x.py, no diffusers converter involved); every other
file gets its own refusal, naming what it is."""

import pytest
import torch

from core.finetune.lora import pipeline_with_lora
from core.finetune.lora_file import LoRAFileError, validate_lora_file
from core.layers.change import forward_order, lora_layer_change
from tests import sd1x
from tests.sd1x import LOCON, TEXT, UNET_ATTN, reference_lora

UNET_ALL = UNET_ATTN + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
ODD_ALPHAS = (1.5, 3.0, 6.0, 0.75)  # not powers of two: a wrong scale cannot round to the right answer


def _adapter_meta(rank, alpha, text=False):
    import json

    meta = {"unet.r": rank, "unet.lora_alpha": alpha}
    if text:
        meta.update({"text_encoder.r": rank, "text_encoder.lora_alpha": alpha})
    return {"format": "pt", "lora_adapter_metadata": json.dumps(meta)}


# name: (reference kwargs, writer(ref) -> (tensors, metadata), format read, notes must mention)
READABLE = {
    "diffusers": (
        dict(unet=UNET_ALL, text=TEXT, ranks=(4,), alphas=(3.0,)),
        lambda ref: (sd1x.diffusers_tensors(ref), _adapter_meta(4, 3.0, text=True)),
        "diffusers",
        (),
    ),
    "diffusers-attn-procs": (
        dict(unet=UNET_ATTN, ranks=(4,), alphas=(4.0,)),
        lambda ref: (sd1x.attn_procs_tensors(ref), {}),
        "diffusers",
        ("alpha = rank",),
    ),
    "peft": (
        dict(unet=UNET_ALL + ("conv1", "conv2"), ranks=(8,), alphas=(8.0,)),
        lambda ref: (sd1x.peft_tensors(ref), {}),
        "peft",
        ("alpha = rank", "adapter_config.json"),
    ),
    "peft-text-encoder": (
        dict(unet=(), text=("fc1", "fc2"), ranks=(2,), alphas=(2.0,)),
        lambda ref: (sd1x.peft_tensors(ref), {}),
        "peft",
        (),
    ),
    "kohya-alphas": (
        dict(unet=UNET_ALL, ranks=(4, 2, 8), alphas=ODD_ALPHAS, dtype=torch.float16),
        lambda ref: (sd1x.kohya_tensors(ref), {"ss_network_dim": "8"}),
        "kohya",
        (),
    ),
    "kohya-text-encoder": (
        dict(unet=UNET_ATTN, text=TEXT, ranks=(4, 8), alphas=ODD_ALPHAS, dtype=torch.float16),
        lambda ref: (sd1x.kohya_tensors(ref), {}),
        "kohya",
        (),
    ),
    "kohya-text-encoder-q-v-only": (
        dict(unet=("to_k",), text=("q_proj", "v_proj"), ranks=(4,), alphas=(2.0,), dtype=torch.bfloat16),
        lambda ref: (sd1x.kohya_tensors(ref, dtype=torch.bfloat16), {}),
        "kohya",
        (),
    ),
    "locon": (
        dict(unet=UNET_ALL + LOCON, ranks=(4, 2), alphas=ODD_ALPHAS, dtype=torch.float16),
        lambda ref: (sd1x.kohya_tensors(ref), {"ss_network_module": "lycoris.kohya"}),
        "kohya",
        (),
    ),
    "kohya-without-alphas": (
        dict(unet=UNET_ATTN, ranks=(4, 2), alphas=(4.0, 2.0), dtype=torch.float16),
        lambda ref: (sd1x.kohya_tensors(ref, alphas=False), {}),
        "kohya",
        ("own rank",),
    ),
}


def _write(tmp_path, name, tensors, meta=None):
    return sd1x.write(tmp_path / f"{name}.safetensors", tensors, meta)


@pytest.mark.parametrize("case", sorted(READABLE))
def test_each_format_reads_to_the_reference_merge_and_layer_list(case, sd1_pipe, tmp_path):
    ref_kw, writer, fmt, notes = READABLE[case]
    ref = reference_lora(sd1_pipe, **ref_kw)
    tensors, meta = writer(ref)
    v = validate_lora_file(_write(tmp_path, case, tensors, meta), sd1_pipe)
    assert v.format == fmt
    for words in notes:
        assert any(words in n for n in v.notes), v.notes
    assert v.ranks == {f"{m.component}.{m.name}": m.rank for m in ref.modules}
    assert v.alphas == pytest.approx({f"{m.component}.{m.name}": m.alpha for m in ref.modules})

    # the merged weights: the app's merge of what it read == W + (alpha / r) up down computed here
    model = pipeline_with_lora(sd1_pipe, v.lora, v.alpha)
    for key, want in sd1x.merged_reference(sd1_pipe, ref).items():
        part, name = key.split(".", 1)
        got = dict(getattr(model, part).named_modules())[name].weight.detach().float()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=key)

    # the heatmap's layers: every UNet layer of the file, in the UNet's forward order, with its change
    changes = lora_layer_change(sd1_pipe, v.lora, v.alpha)
    unet = ref.of("unet")
    assert [c.name for c in changes] == forward_order([m.name for m in unet])  # unet: in registration order
    weights = dict(sd1_pipe.unet.named_modules())
    for c in changes:
        m = next(m for m in unet if m.name == c.name)
        w = weights[c.name].weight.detach().float()
        assert c.relative == pytest.approx(float(m.delta(w).norm() / w.norm()), rel=1e-4)


def test_kohya_reads_as_diffusers_itself_loads_it(sd1_pipe, tmp_path):
    """diffusers' own load_lora_weights + fuse_lora of the same kohya file gives the same UNet and text
    encoder. One alpha for every layer here: with per-layer alphas diffusers 0.42.1's loader keeps the
    alpha of no attention layer (its alpha_pattern keys still read "...processor.to_q_lora.down.weight",
    and peft warns they match nothing), so the per-layer case is checked against the direct merge above."""
    import copy

    ref = reference_lora(
        sd1_pipe, unet=UNET_ALL + ("conv1",), text=TEXT, ranks=(4, 2), alphas=(3.0,), dtype=torch.float16
    )
    path = _write(tmp_path, "kohya", sd1x.kohya_tensors(ref))
    v = validate_lora_file(path, sd1_pipe)
    ours = pipeline_with_lora(sd1_pipe, v.lora, v.alpha)
    theirs = copy.copy(sd1_pipe)
    theirs.unet, theirs.text_encoder = copy.deepcopy(sd1_pipe.unet), copy.deepcopy(sd1_pipe.text_encoder)
    theirs.load_lora_weights(str(path))
    theirs.fuse_lora()
    for part in ("unet", "text_encoder"):
        mine = dict(getattr(ours, part).named_modules())
        for m in ref.of(part):
            layer = dict(getattr(theirs, part).named_modules())[m.name]
            fused = (layer.base_layer if hasattr(layer, "base_layer") else layer).weight.detach().float()
            torch.testing.assert_close(mine[m.name].weight.detach().float(), fused, rtol=1e-4, atol=1e-5)


# refusals ---------------------------------------------------------------------------------------

REFUSED = {  # name: (tensors maker, reason, words the sentence must contain)
    "loha": (sd1x.loha, "lycoris", ("LoHa", "plain LoRA")),
    "lokr": (sd1x.lokr, "lycoris", ("LoKr", "plain LoRA")),
    "dora-kohya": (sd1x.dora_kohya, "dora", ("DoRA", "dora_scale", "plain LoRA")),
    "dora-peft": (sd1x.dora_peft, "dora", ("DoRA", "lora_magnitude_vector")),
    "sdxl-kohya": (sd1x.sdxl_kohya, "other_family", ("SDXL",)),
    "sdxl-diffusers": (sd1x.sdxl_diffusers, "other_family", ("SDXL",)),
    "sd2": (sd1x.sd2, "other_family", ("Stable Diffusion 2.x", "this app is running")),
    "flux": (sd1x.flux, "other_family", ("FLUX",)),
    "sd15-for-another-model": (
        sd1x.sd15_real,
        "other_family",
        ("Stable Diffusion 1.x", "this app is running", "--model"),
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_cannot_be_read_gets_its_own_sentence(case, sd1_pipe, tmp_path):
    make, reason, words = REFUSED[case]
    with pytest.raises(LoRAFileError) as info:
        validate_lora_file(_write(tmp_path, case, make(sd1_pipe)), sd1_pipe)
    msg = str(info.value)
    assert info.value.reason == reason, msg
    for w in words:
        assert w in msg, msg
    assert msg[0].isupper() and msg.endswith(".")


def test_an_sd1_kohya_file_on_another_base_is_refused_by_its_layers(sd1_pipe, tiny_pipe, tmp_path):
    """The wrong base: a kohya LoRA of the SD 1.x layout, uploaded to the app running the embedded layout."""
    ref = reference_lora(sd1_pipe, unet=UNET_ALL, dtype=torch.float16)
    with pytest.raises(LoRAFileError) as info:
        validate_lora_file(_write(tmp_path, "k", sd1x.kohya_tensors(ref)), tiny_pipe)
    assert info.value.reason in ("unknown_module", "shape") and "model" in str(info.value)


def test_a_kohya_layer_missing_its_up_matrix(sd1_pipe, tmp_path):
    t = sd1x.kohya_tensors(reference_lora(sd1_pipe))
    gone = next(k for k in sorted(t) if k.endswith(".lora_up.weight"))
    del t[gone]
    with pytest.raises(LoRAFileError) as info:
        validate_lora_file(_write(tmp_path, "half", t), sd1_pipe)
    assert info.value.reason == "missing_pair" and "lora_up" in str(info.value)


def test_a_kohya_alpha_must_be_positive(sd1_pipe, tmp_path):
    t = sd1x.kohya_tensors(reference_lora(sd1_pipe))
    t[next(k for k in sorted(t) if k.endswith(".alpha"))] = torch.tensor(-1.0).half()
    with pytest.raises(LoRAFileError) as info:
        validate_lora_file(_write(tmp_path, "neg", t), sd1_pipe)
    assert info.value.reason == "alpha"
