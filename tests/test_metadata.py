"""The metadata scanner (core.finetune.metadata) on generated files: a kohya-style file carrying every kind of
leaking entry, this app's own file, values that leak under any key, hostile files; the cleaned copy
keeps the tensors byte for byte and none of the leaking entries, and still loads."""

import json
import pickle
import struct

import pytest
import torch
from safetensors import safe_open

from core.finetune import metadata
from core.finetune.lora_file import validate_lora_file
from core.finetune.metadata import MetadataError, clean_file, scan_file, scan_metadata
from tests import sd1x
from tests.sd1x import LEAKS, UNET_ATTN, reference_lora


@pytest.fixture(scope="module")
def kohya_file(sd1_pipe, tmp_path_factory):
    ref = reference_lora(
        sd1_pipe, unet=UNET_ATTN + ("conv1",), text=("q_proj",), ranks=(4, 2), alphas=(3.0, 1.5), dtype=torch.float16
    )
    path = tmp_path_factory.mktemp("meta") / "anna_lora_v2.safetensors"
    return sd1x.write(path, sd1x.kohya_tensors(ref), sd1x.kohya_metadata())


def data_section(path):
    raw = path.read_bytes()
    return raw[8 + struct.unpack("<Q", raw[:8])[0] :]


def test_every_entry_is_shown_and_every_leak_flagged_with_its_kind(kohya_file):
    scan = scan_file(kohya_file)
    meta = sd1x.kohya_metadata()
    assert sorted(f.key for f in scan.findings) == sorted(meta)  # every key, once
    flagged = {f.key: f.kind for f in scan.leaks}
    assert flagged == LEAKS
    assert all(f.why and f.why[0].isupper() for f in scan.findings)
    assert scan.findings[: len(LEAKS)] == scan.leaks  # the leaks come first
    assert "sks woman" in scan.triggers


def test_the_big_entries_are_decoded_into_what_they_say(kohya_file):
    by_key = {f.key: f for f in scan_file(kohya_file).findings}
    tags = " ".join(by_key["ss_tag_frequency"].details)
    assert "'sks woman' x23" in tags and "'holding a dog' x2" in tags
    assert by_key["ss_dataset_dirs"].details == ("folder '10_sks woman': 23 photos, repeated 10x",)
    assert (
        "class_tokens 'sks woman'" in by_key["ss_datasets"].details[0]
        and "Pictures" in by_key["ss_datasets"].details[0]
    )
    assert "user name ('alice')" in by_key["ss_datasets"].why
    assert by_key["ss_training_started_at"].details == ("2024-05-01 08:53 UTC",)
    assert "user name ('alice')" in by_key["ss_sd_model_name"].why
    assert by_key["ss_learning_rate"].kind == "" and "setting" in by_key["ss_learning_rate"].why


def test_cleaned_copy_has_the_same_tensors_and_none_of_the_leaks(kohya_file, sd1_pipe, tmp_path):
    out = clean_file(kohya_file, tmp_path / "clean.safetensors")
    assert data_section(out) == data_section(kohya_file)  # the tensor bytes, verbatim
    with safe_open(str(kohya_file), "pt") as a, safe_open(str(out), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert (
                x.dtype == y.dtype
                and x.shape == y.shape
                and x.reshape(-1).view(torch.uint8).equal(y.reshape(-1).view(torch.uint8))
            )
        left = b.metadata() or {}
    assert not set(left) & set(LEAKS)
    assert scan_file(out).leaks == []
    # and it still reads to the same LoRA
    before, after = validate_lora_file(kohya_file, sd1_pipe), validate_lora_file(out, sd1_pipe)
    assert before.alpha == after.alpha and all(torch.equal(before.lora[k], after.lora[k]) for k in before.lora)


def test_this_apps_file_keeps_what_loading_needs_and_loses_its_step_count(tiny_pipe, tmp_path):
    from core.attack.report import recorded_steps
    from core.finetune.lora import save_lora
    from tests.bad_inputs import random_lora

    path = save_lora(tmp_path / "mine.safetensors", random_lora(tiny_pipe, text_encoder=True))
    scan = scan_file(path)
    assert {f.key: f.kind for f in scan.leaks} == {"leaklab_steps": "steps"}
    out = clean_file(path, tmp_path / "mine-clean.safetensors")
    with safe_open(str(out), "pt") as f:
        kept = f.metadata()
    assert set(kept) == {
        "format",
        "lora_adapter_metadata",
        "leaklab_alpha",
        "leaklab_rank",
        "leaklab_format",
        "leaklab_base_model",
        "leaklab_base_fingerprint",
    }
    a, b = validate_lora_file(path, tiny_pipe), validate_lora_file(out, tiny_pipe)
    assert a.alpha == b.alpha and a.notes == b.notes == [] and set(a.lora) == set(b.lora)
    assert recorded_steps(b.meta) is None and recorded_steps(a.meta) == 1


@pytest.mark.parametrize(
    "value, kind, word",
    [
        ("/home/bob/datasets/me", "path", "'bob'"),
        ("D:\\Users\\carol\\lora", "path", "'carol'"),
        ("/workspace/train/10_zzx person", "path", "folders"),
        ("mail bob@example.org", "contact", "e-mail"),
        ("see https://example.org/u/bob", "contact", "web"),
        ("a3f" * 16, "hash", "hash"),
        ("trained 2023-11-05", "date", "date"),
        ("0.0001", "", "does not know"),
    ],
)
def test_values_that_leak_under_any_key(value, kind, word):
    f = scan_metadata({"my_trainer_field": value}).findings[0]
    assert f.kind == kind and word in f.why


def test_a_needed_entry_that_leaks_is_dropped():
    meta = {"leaklab_base_model": "/home/dave/models/sd15", "format": "pt"}
    assert metadata.cleaned_metadata(meta) == {"format": "pt"}


def test_hostile_files_are_refused_with_a_sentence(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(MetadataError, match="pickle"):
        scan_file(bad)
    header = json.dumps(
        {"__metadata__": {"a": 1}, "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    ).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(MetadataError):
        scan_file(bad)


def test_the_cli_scans_and_cleans(kohya_file, tmp_path, capsys):
    assert metadata.main(["scan", str(kohya_file)]) == 0
    text = capsys.readouterr().out
    assert f"{len(LEAKS)} of them give something away" in text and "! the captions of the training photos" in text
    assert "likely trigger word(s): 'sks woman'" in text
    out = tmp_path / "c.safetensors"
    assert metadata.main(["clean", str(kohya_file), "--out", str(out)]) == 0
    assert "byte for byte" in capsys.readouterr().out and data_section(out) == data_section(kohya_file)
    with pytest.raises(SystemExit):
        metadata.main(["clean", str(kohya_file), "--out", str(kohya_file)])
