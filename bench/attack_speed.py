"""Time of one weight-only attack: attacker encoder + merging the LoRA + sampling 4 images (the app's
attack: ``ATTACK_SAMPLER_STEPS`` steps extrapolated with ``ATTACK_W``, two UNet passes per step).

    python -m bench.attack_speed [--repeats 5] [--compare old]

Uses the shipped attacker and base and a shadow LoRA from the population cache (or, if there is
none, a LoRA fine-tuned on the first example face). Prints the best-of-N wall time of each part
and of the whole attack, next to the same 4 images sampled from the base model alone (the cost
the attack adds on top of plain sampling). ``--compare old``: the same timings in the same run on
the 64 px base the embedded one replaced, with the attacker trained for it (both from git history),
on a LoRA of the first example face.
"""

from __future__ import annotations

import argparse
import time

import torch

from core import ASSETS
from core.attack.attacker import ATTACK_SAMPLER_STEPS, ATTACK_W, load_attacker
from core.attack.baselines import extrapolate
from core.finetune.lora import pipeline_with_lora
from core.model.pipeline import image_size_of, load_pipeline, sample_images


def best(fn, n):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), out


def a_lora(pipe, shadows: bool = True):
    from core.attack.shadow import list_shadows, load_shadow

    files = list_shadows() if shadows else []
    if files:
        s = load_shadow(files[-1])
        return s.checkpoints[max(s.checkpoints)], max(s.checkpoints)
    from core.events import drain
    from core.faces.ingest import ingest_face
    from core.finetune.lora import FinetuneConfig, finetune

    size = image_size_of(pipe)
    photos = [
        ingest_face(p.read_bytes(), size=size).crop
        for p in sorted((ASSETS / "examples" / "person_1000").glob("*.png"))[:5]
    ]
    return drain(finetune(pipe, photos, FinetuneConfig(checkpoint_every=0, preview_n=0))).lora, 80


def time_attack(pipe, attacker, lora, step: int, repeats: int) -> dict:
    """Best-of-``repeats`` seconds of each part of one attack, and of the same 4 images from the base alone."""
    t_enc, z = best(lambda: attacker.encode([lora], [step]), repeats)
    t_merge, view = best(lambda: pipeline_with_lora(pipe, lora), repeats)
    emb = z.expand(4, -1, -1)
    t_sample, _ = best(
        lambda: extrapolate(pipe, view, emb, ATTACK_W, seeds=[0, 1, 2, 3], steps=ATTACK_SAMPLER_STEPS), repeats
    )
    t_base, _ = best(lambda: sample_images(pipe, n=4, seed=0, steps=ATTACK_SAMPLER_STEPS), repeats)
    total = t_enc + t_merge + t_sample
    return {"encoder": t_enc, "merge": t_merge, "sampling": t_sample, "total": total, "base": t_base}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--compare", choices=("old",), default=None, help="also time the 64 px base it replaced with its own attacker"
    )
    a = ap.parse_args(argv)
    pipe = load_pipeline(None)
    attacker, _ = load_attacker()
    lora, step = a_lora(pipe)
    t = time_attack(pipe, attacker, lora, step, a.repeats)
    print(
        f"threads {torch.get_num_threads()}, best of {a.repeats}, 4 images x {ATTACK_SAMPLER_STEPS} sampler steps "
        f"extrapolated with w = {ATTACK_W:g} (base and LoRA model each step)"
    )
    print(
        f"embedded ({image_size_of(pipe)} px): encoder {t['encoder'] * 1000:.0f} ms, "
        f"merge LoRA {t['merge'] * 1000:.0f} ms, sampling {t['sampling'] * 1000:.0f} ms"
    )
    print(
        f"whole attack: {t['total']:.2f} s (target <= 1.5 s); base-model sampling of the same 4 images alone: "
        f"{t['base']:.2f} s"
    )
    if not a.compare:
        return
    from core.rebuild import old_attacker, old_base

    if old_base() is None:
        print("no old base here (not a git checkout holding its commit): comparison left out")
        return
    del pipe, attacker, lora  # one model in memory at a time
    pipe = load_pipeline(old_base())
    attacker, _ = load_attacker(old_attacker())
    lora, step = a_lora(pipe, shadows=False)  # the shadow cache holds the embedded base's LoRAs
    o = time_attack(pipe, attacker, lora, step, a.repeats)
    print(
        f"old 64 px base, same run: encoder {o['encoder'] * 1000:.0f} ms, merge LoRA {o['merge'] * 1000:.0f} ms, "
        f"sampling {o['sampling'] * 1000:.0f} ms, whole attack {o['total']:.2f} s; "
        f"the embedded base's attack takes {t['total'] / o['total']:.2f}x its time"
    )


if __name__ == "__main__":
    main()
