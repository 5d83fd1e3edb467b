"""Validation of untrusted LoRA uploads (core.finetune.lora_file) on the tiny random pipeline: a file written
by save_lora passes and reads back exactly as load_lora reads it; every kind of bad file is refused
with its own reason and a readable sentence, and nothing is ever unpickled."""

import copy
import json
import struct
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.finetune import lora_file
from core.finetune.lora import FinetuneConfig, FinetuneResult, load_lora, lora_config, lora_state_dict, save_lora
from core.finetune.lora_file import LoRAFileError, ValidatedLoRA, validate_lora_file
from core.model.pipeline import load_pipeline
from core.model.prior import base_fingerprint
from tests.bad_inputs import random_lora

RANK = 4


@pytest.fixture(scope="module")
def tiny_pipe(tiny_pipeline_dir):
    return load_pipeline(tiny_pipeline_dir, device="cpu")


@pytest.fixture(scope="module")
def lora_result(tiny_pipe):
    """A FinetuneResult-like LoRA straight from peft adapters (no training): random A and B."""
    return random_lora(tiny_pipe, rank=RANK, alpha=2.0, text_encoder=True)


@pytest.fixture(scope="module")
def good_file(lora_result, tmp_path_factory):
    return save_lora(tmp_path_factory.mktemp("lora") / "good.safetensors", lora_result)


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def rewrite(src, dst, edit):
    """Copy a safetensors file, letting ``edit(tensors, meta)`` change it in place first."""
    tensors, meta = read(src)
    edit(tensors, meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst), metadata=meta)
    return dst


def refused(path, pipe, reason, **kw) -> LoRAFileError:
    with pytest.raises(LoRAFileError) as info:
        validate_lora_file(path, pipe, **kw)
    err = info.value
    msg = str(err)
    assert err.reason == reason, msg
    assert isinstance(err, ValueError) and msg[0].isupper() and msg.rstrip().endswith((".", ")")) and len(msg) > 30
    return err


def first_key(tensors, part="unet", suffix="lora_A.weight"):
    return next(k for k in sorted(tensors) if k.startswith(part + ".") and k.endswith(suffix))


# the good file --------------------------------------------------------------------------------


def test_valid_file_reads_like_load_lora(good_file, lora_result, tiny_pipe):
    v = validate_lora_file(good_file, tiny_pipe)
    assert isinstance(v, ValidatedLoRA)
    expected, meta = load_lora(good_file)
    assert set(v.lora) == set(expected) == set(lora_result.lora)
    assert all(torch.equal(v.lora[k], expected[k]) and v.lora[k].dtype == torch.float32 for k in expected)
    assert v.meta == meta and v.rank == RANK and v.alpha == lora_result.config.alpha
    unet_names = {k[len("unet.") :].rsplit(".lora_", 1)[0] for k in expected if k.startswith("unet.")}
    assert v.modules == sorted(unet_names) and v.notes == []
    assert any(k.startswith("text_encoder.") for k in v.lora)


def test_half_precision_without_our_metadata_is_accepted_with_notes(good_file, tiny_pipe, tmp_path):
    def edit(t, meta):
        for k in t:
            t[k] = t[k].half()
        meta.clear()

    v = validate_lora_file(rewrite(good_file, tmp_path / "plain.safetensors", edit), tiny_pipe)
    assert all(x.dtype == torch.float32 for x in v.lora.values())
    assert v.alpha == float(RANK) and len(v.notes) == 2
    assert any("fingerprint" in n for n in v.notes) and any("alpha" in n for n in v.notes)


def test_alpha_falls_back_to_leaklab_alpha(good_file, tiny_pipe, tmp_path):
    path = rewrite(
        good_file,
        tmp_path / "a.safetensors",
        lambda t, m: (m.pop("lora_adapter_metadata"), m.update(leaklab_alpha="3.5")),
    )
    assert validate_lora_file(path, tiny_pipe).alpha == 3.5


def test_header_length_starting_with_0x80_is_not_mistaken_for_pickle(good_file, tiny_pipe, tmp_path):
    # a header of 0x0280 (or 0x0380 ...) bytes makes the file start 0x80 0x02, like a protocol-2 pickle
    from safetensors.torch import save

    tensors, meta = read(good_file)
    a = first_key(tensors)
    b = a.replace("lora_A", "lora_B")
    tensors = {a: tensors[a], b: tensors[b]}  # one layer keeps the header short
    blob = next(
        blob
        for pad in range(2048)
        for blob in [save(tensors, metadata={**meta, "pad": "x" * pad})]
        if blob[0] == 0x80 and 2 <= blob[1] <= 5
    )
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    assert validate_lora_file(path, tiny_pipe).rank == RANK


# refusals before any tensor is read ------------------------------------------------------------


def test_pickle_is_refused_without_loading(tiny_pipe, tmp_path, monkeypatch):
    path = tmp_path / "lora.bin"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    err = refused(path, tiny_pipe, "pickle")
    assert ".safetensors" in str(err) and "code" in str(err)


def test_zip_checkpoint_is_refused(tiny_pipe, tmp_path):
    path = tmp_path / "lora.pt"
    torch.save({"w": torch.zeros(2)}, path)  # torch's default format is a zip archive
    assert zipfile.is_zipfile(path)
    assert "lora.pt" in str(refused(path, tiny_pipe, "pickle"))


def test_random_bytes_are_not_safetensors(tiny_pipe, tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(
        bytes(torch.randint(1, 256, (1000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).tolist())
    )
    if path.read_bytes()[0] == 0x80:
        path.write_bytes(b"\x01" + path.read_bytes()[1:])
    assert "safetensors" in str(refused(path, tiny_pipe, "not_safetensors"))


@pytest.mark.parametrize("header", [b"[1, 2]", b"{not json}"])
def test_header_must_be_a_json_object(tiny_pipe, tmp_path, header):
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    refused(path, tiny_pipe, "not_safetensors")


def test_broken_tensor_table_is_not_safetensors(tiny_pipe, tmp_path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}).encode()
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)  # far fewer data bytes than declared
    refused(path, tiny_pipe, "not_safetensors")


def test_empty_and_missing_files(tiny_pipe, tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert "empty" in str(refused(tmp_path / "empty.safetensors", tiny_pipe, "empty"))
    refused(tmp_path / "nope.safetensors", tiny_pipe, "missing")


def test_too_large_is_refused_before_reading(good_file, tiny_pipe, monkeypatch):
    monkeypatch.setattr(lora_file, "MAX_BYTES", good_file.stat().st_size - 1)
    monkeypatch.setattr(lora_file, "_check_header", lambda *a: pytest.fail("the file was read"))
    assert "KB" in str(refused(good_file, tiny_pipe, "too_large"))


def test_too_many_tensors(good_file, tiny_pipe, monkeypatch):
    monkeypatch.setattr(lora_file, "MAX_TENSORS", 3)
    refused(good_file, tiny_pipe, "too_many_tensors")


# refusals about the tensors --------------------------------------------------------------------


def test_int_dtype(good_file, tiny_pipe, tmp_path):
    def edit(t, m):
        k = first_key(t)
        t[k] = t[k].to(torch.int32)

    assert "I32" in str(refused(rewrite(good_file, tmp_path / "i.safetensors", edit), tiny_pipe, "dtype"))


def test_non_lora_keys(tiny_pipe, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3), "conv_in.bias": torch.zeros(4)}, str(path))
    err = refused(path, tiny_pipe, "no_lora_keys")
    assert "lora_A" in str(err)


def test_stray_key_beside_lora_keys(good_file, tiny_pipe, tmp_path):
    path = rewrite(
        good_file, tmp_path / "s.safetensors", lambda t, m: t.update({"unet.conv_in.weight": torch.zeros(2)})
    )
    assert "unet.conv_in.weight" in str(refused(path, tiny_pipe, "unknown_module"))


def rename_module(t, old, new):
    for k in [k for k in t if k.startswith(old + ".lora_")]:
        t[k.replace(old, new, 1)] = t.pop(k)


def test_module_that_does_not_exist(good_file, tiny_pipe, tmp_path):
    def edit(t, m):
        old = first_key(t).rsplit(".lora_A", 1)[0]
        rename_module(t, old, "unet.down_blocks.9.attentions.0.proj_in")

    err = refused(rewrite(good_file, tmp_path / "m.safetensors", edit), tiny_pipe, "unknown_module")
    assert "down_blocks.9" in str(err)


def test_module_that_is_not_linear_or_conv(good_file, tiny_pipe, tmp_path):
    def edit(t, m):
        rename_module(t, first_key(t).rsplit(".lora_A", 1)[0], "unet.conv_norm_out")  # a GroupNorm

    refused(rewrite(good_file, tmp_path / "g.safetensors", edit), tiny_pipe, "unknown_module")


def test_missing_b(good_file, tiny_pipe, tmp_path):
    def edit(t, m):
        del t[first_key(t, suffix="lora_B.weight")]

    assert "lora_B" in str(refused(rewrite(good_file, tmp_path / "b.safetensors", edit), tiny_pipe, "missing_pair"))


def test_wrong_shape(good_file, tiny_pipe, tmp_path):
    def edit(t, m):
        k = first_key(t)
        t[k] = torch.zeros(t[k].shape[0], t[k].shape[1] + 1, *t[k].shape[2:])

    err = refused(rewrite(good_file, tmp_path / "w.safetensors", edit), tiny_pipe, "shape")
    assert "shape" in str(err)


def test_a_layer_of_its_own_rank_is_read_at_that_rank(good_file, tiny_pipe, tmp_path):
    # kohya's resized LoRAs give layers ranks of their own: each layer is read (and merged) at its rank
    a = None

    def edit(t, m):
        nonlocal a
        a = first_key(t)
        b = a.replace("lora_A", "lora_B")
        t[a], t[b] = t[a][:2].clone(), t[b][:, :2].clone()

    v = validate_lora_file(rewrite(good_file, tmp_path / "r.safetensors", edit), tiny_pipe)
    layer = a.removesuffix(".lora_A.weight")
    assert v.ranks[layer] == 2 and v.rank == RANK and set(v.ranks.values()) == {2, RANK}
    assert v.lora[a].shape[0] == 2


def test_rank_too_large(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(lora_file, "MAX_RANK", RANK - 1)
    with pytest.raises(LoRAFileError) as info:
        validate_lora_file(save_lora(tmp_path / "big.safetensors", fresh_result(tiny_pipe)), tiny_pipe)
    assert info.value.reason == "rank"


def fresh_result(pipe):
    cfg = FinetuneConfig(rank=RANK)
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(lora_config(cfg, ["to_q"]))
    return FinetuneResult(lora_state_dict(unet), "t", cfg, base_fingerprint(pipe))


def test_nan_values(good_file, tiny_pipe, tmp_path):
    def edit(t, m):
        k = first_key(t, suffix="lora_B.weight")
        t[k] = t[k].clone()
        t[k].view(-1)[0] = float("nan")

    refused(rewrite(good_file, tmp_path / "n.safetensors", edit), tiny_pipe, "non_finite")


# refusals about the metadata -------------------------------------------------------------------


def test_base_fingerprint_mismatch(good_file, tiny_pipe, tmp_path):
    path = rewrite(
        good_file,
        tmp_path / "f.safetensors",
        lambda t, m: m.update(leaklab_base_fingerprint="0123456789abcdef", leaklab_base_model="runwayml/sd-1.5"),
    )
    msg = str(refused(path, tiny_pipe, "base_mismatch"))
    assert "0123456789abcdef" in msg and base_fingerprint(tiny_pipe) in msg and "runwayml/sd-1.5" in msg
    assert "different base model" in msg


@pytest.mark.parametrize("alpha", [-1.0, 0.0, "nan", "lots"])
def test_bad_alpha(good_file, tiny_pipe, tmp_path, alpha):
    def edit(t, m):
        adapter = json.loads(m["lora_adapter_metadata"])
        adapter["unet.lora_alpha"] = alpha
        m["lora_adapter_metadata"] = json.dumps(adapter)

    refused(rewrite(good_file, tmp_path / "al.safetensors", edit), tiny_pipe, "alpha")


def test_adapter_metadata_not_json(good_file, tiny_pipe, tmp_path):
    path = rewrite(good_file, tmp_path / "j.safetensors", lambda t, m: m.update(lora_adapter_metadata="{oops"))
    refused(path, tiny_pipe, "metadata")


# what the probe of issue 17 found: hostile headers and values, misleading messages -----------------


def raw_file(tmp_path, header: bytes, data: bytes = b"", length=None):
    path = tmp_path / "raw.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


@pytest.mark.parametrize(
    "header, data, words",
    [
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", "nested far deeper"),
        (
            b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "x": {"dtype": "F32", "shape": [1], '
            b'"data_offsets": [0, 4]}}',
            bytes(4),
            "twice",
        ),
        (
            json.dumps(
                {
                    "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
                }
            ).encode(),
            bytes(24),
            "share bytes",
        ),
        (
            json.dumps({"a": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 16]}}).encode(),
            bytes(16),
            "1099511627776 values",
        ),
        (
            json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode(),
            bytes(8),
            "beyond the end",
        ),
    ],
    ids=["nested", "duplicate-keys", "overlap", "2^40-values", "beyond-the-end"],
)
def test_hostile_headers_get_their_own_sentence(tiny_pipe, tmp_path, header, data, words):
    err = refused(raw_file(tmp_path, header, data), tiny_pipe, "not_safetensors")
    assert words in str(err)


def test_huge_metadata_is_refused(tiny_pipe, tmp_path):
    header = json.dumps(
        {"__metadata__": {"n": "x" * 2**21}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    )
    refused(raw_file(tmp_path, header.encode(), bytes(4)), tiny_pipe, "metadata")


def test_deeply_nested_adapter_metadata(good_file, tiny_pipe, tmp_path):
    path = rewrite(
        good_file, tmp_path / "d.safetensors", lambda t, m: m.update(lora_adapter_metadata="[" * 10**5 + "]" * 10**5)
    )
    refused(path, tiny_pipe, "metadata")


def test_transposed_and_swapped_matrices_are_named(good_file, tiny_pipe, tmp_path):
    def transpose(t, m):
        for k in t:
            if t[k].ndim == 2:
                t[k] = t[k].T.contiguous()

    def swap(t, m):
        for k in [k for k in t if k.endswith("lora_A.weight") and t[k].ndim == 2]:
            b = k.replace("lora_A", "lora_B")
            t[k], t[b] = t[b], t[k]

    assert "stored transposed" in str(
        refused(rewrite(good_file, tmp_path / "t.safetensors", transpose), tiny_pipe, "transposed")
    )
    assert "swapped" in str(refused(rewrite(good_file, tmp_path / "s.safetensors", swap), tiny_pipe, "transposed"))


def test_a_text_encoder_only_lora_is_told_so(good_file, tiny_pipe, tmp_path):
    def te_only(t, m):
        for k in [k for k in t if k.startswith("unet.")]:
            del t[k]

    path = rewrite(good_file, tmp_path / "te.safetensors", te_only)
    assert "only the text encoder" in str(refused(path, tiny_pipe, "text_encoder_only", need_unet=True))
    peft_named, _ = load_lora(path)  # the same weights under peft names: diffusers cannot convert those
    save_file({k: v.contiguous() for k, v in peft_named.items()}, str(tmp_path / "te_peft.safetensors"))
    refused(tmp_path / "te_peft.safetensors", tiny_pipe, "text_encoder_only", need_unet=True)
    # a real format (a peft adapter of a text encoder): read when no UNet layer is needed (the membership check)
    v = validate_lora_file(tmp_path / "te_peft.safetensors", tiny_pipe)
    assert v.modules == [] and all(k.startswith("text_encoder.") for k in v.ranks)


def test_rank_zero_is_told_so(good_file, tiny_pipe, tmp_path):
    def rank0(t, m):
        for k in t:
            t[k] = t[k][:0].contiguous() if "lora_A" in k or ".down." in k else t[k][:, :0].contiguous()

    assert "rank is 0" in str(refused(rewrite(good_file, tmp_path / "r0.safetensors", rank0), tiny_pipe, "rank"))


@pytest.mark.parametrize("edit", ["weights", "alpha"])
def test_weights_or_alpha_that_would_make_the_model_infinite(good_file, tiny_pipe, tmp_path, edit):
    def change(t, m):
        if edit == "weights":
            for k in t:
                t[k] = torch.full_like(t[k], 3e38) * (1 if "lora_A" in k else -1)
        else:
            adapter = json.loads(m["lora_adapter_metadata"])
            adapter["unet.lora_alpha"] = 1e308
            m["lora_adapter_metadata"] = json.dumps(adapter)

    err = refused(rewrite(good_file, tmp_path / "v.safetensors", change), tiny_pipe, "too_large_values")
    assert "times its own size" in str(err)


@pytest.mark.parametrize("steps", [str(2**63), "1" + "0" * 4000, "-3", "ten"])
def test_a_step_count_out_of_range_is_ignored_with_a_note(good_file, tiny_pipe, tmp_path, steps):
    from core.attack.report import recorded_steps

    v = validate_lora_file(
        rewrite(good_file, tmp_path / "s.safetensors", lambda t, m: m.update(leaklab_steps=steps)), tiny_pipe
    )
    assert recorded_steps(v.meta) is None and any("is ignored" in n for n in v.notes)
