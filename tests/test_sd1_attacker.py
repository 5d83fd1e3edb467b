"""Training the attacker for another base: the shadow and attacker-training commands, run by model id on the
tiny SD 1.x-layout pipeline (CLIP tokenizer, 77-token prompts, AutoencoderKL, epsilon prediction), a few
LoRAs and a few steps; the attacker they make is the one the app then uses for that base, and under
``accelerate launch`` two processes train one attacker together."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from core.attack.shadow import ShadowJob, list_shadows, load_shadow

SHADOW_ARGS = ["--steps", "4", "--record-every", "2", "--n-class", "2", "--group", "2", "--batch", "1"]
TRAIN_ARGS = [
    "--steps",
    "3",
    "--loras-per-step",
    "2",
    "--latents-per-lora",
    "2",
    "--holdout",
    "1",
    "--eval-every",
    "3",
    "--warmup",
    "1",
    "--min-step",
    "2",
    "--width",
    "32",
    "--layers",
    "1",
]


def fake_people(folder, n: int = 4, photos: int = 3):
    """An LFW-layout folder of ``n`` people (noise photos: the fixed central crop stands in for the
    alignment) and a shadow plan naming them."""
    jobs = []
    for i in range(n):
        (folder / f"P{i}").mkdir(parents=True)
        names = []
        for j in range(photos):
            img = np.random.default_rng(10 * i + j).integers(0, 256, (250, 250, 3), dtype=np.uint8)
            Image.fromarray(img).save(folder / f"P{i}" / f"P{i}_{j}.jpg")
            names.append(f"P{i}_{j}.jpg")
        jobs.append(ShadowJob(f"P{i}", names, seed=100 + i).__dict__)
    plan = folder / "plan.json"
    plan.write_text(json.dumps(jobs))
    return folder, plan


@pytest.fixture(scope="module")
def sd1_shadows(sd1_pipeline_dir, sd1_pipe, tmp_path_factory):
    """The shadow command on the SD 1.x model id: 4 LoRAs of 4 steps."""
    from core.attack import shadow

    tmp = tmp_path_factory.mktemp("sd1_shadow")
    root, plan = fake_people(tmp / "people")
    out = tmp / "shadow"
    shadow.main(
        ["--model", str(sd1_pipeline_dir), "--plan", str(plan), "--data", str(root), "--out", str(out), *SHADOW_ARGS]
    )
    return out


def test_shadow_command_trains_loras_for_the_sd1_base(sd1_shadows, sd1_pipe):
    from core.model.pipeline import image_size_of
    from core.model.prior import base_fingerprint

    files = list_shadows(sd1_shadows)
    assert len(files) == 4
    s = load_shadow(files[0])
    side = image_size_of(sd1_pipe) // sd1_pipe.vae_scale_factor
    assert s.meta["base"] == base_fingerprint(sd1_pipe) and sorted(s.checkpoints) == [2, 4]
    assert tuple(s.latents.shape) == (6, 4, side, side)  # 3 photos aligned at the model's resolution, and mirrors
    lora = s.checkpoints[4]
    assert any(".attentions.1.transformer_blocks.0.attn2.to_k.lora_A" in k for k in lora)  # SD 1.x's second attention


def test_attacker_command_makes_the_attacker_the_app_uses_for_that_base(
    sd1_shadows, sd1_pipeline_dir, sd1_pipe, tmp_path
):
    from core.attack import train
    from core.attack.attacker import load_attacker
    from core.attack.report import attack_lora
    from core.engine import Engine
    from core.model.prior import base_fingerprint

    out = tmp_path / "attacker.safetensors"
    train.main(["--model", str(sd1_pipeline_dir), "--shadow", str(sd1_shadows), "--out", str(out), *TRAIN_ARGS])
    model, info = load_attacker(out)
    assert model.cfg.base == base_fingerprint(sd1_pipe)
    assert (model.cfg.text_len, model.cfg.text_dim) == (77, sd1_pipe.text_encoder.config.hidden_size)
    log = json.loads(out.with_suffix(".json").read_text())
    assert log["log"]["steps_done"] == 3 and log["final_eval"]["attacker"] > 0

    engine = Engine(str(sd1_pipeline_dir), "cpu", attacker=str(out))
    attacker, why = engine.attacker()
    assert attacker is not None and why == ""
    victim = load_shadow(list_shadows(sd1_shadows)[-1])  # held out of the attacker's training
    images = attack_lora(engine.pipe, attacker, victim.checkpoints[4], 4, alpha=4.0, seeds=(0, 1))
    assert len(images.attack) == 2 and images.attack[0].shape == (64, 64, 3) and images.attack_note == ""


def test_two_processes_launched_by_accelerate_train_one_attacker(sd1_shadows, sd1_pipeline_dir, tmp_path):
    """The README's multi-GPU command, for real: ``accelerate launch --multi_gpu --num_processes 2`` (over
    gloo on this CPU) trains one attacker data-parallel; the main process writes it."""
    out = tmp_path / "attacker.safetensors"
    env = {**os.environ, "LEAKLAB_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "LEAKLAB_CACHE": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "core.attack.train",
        "--model",
        str(sd1_pipeline_dir),
        "--shadow",
        str(sd1_shadows),
        "--out",
        str(out),
        *TRAIN_ARGS,
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("attacker -> ") == 1  # written once, by the main process
    log = json.loads(out.with_suffix(".json").read_text())["log"]
    assert log["processes"] == 2 and log["steps_done"] == 3 and len(log["eval"]) == 1
