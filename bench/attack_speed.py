"""Time of one weight-only attack: attacker encoder + merging the LoRA + sampling 4 images (the app's
attack: ``ATTACK_SAMPLER_STEPS`` steps extrapolated with ``ATTACK_W``, two UNet passes per step).

    python -m bench.attack_speed [--repeats 5]

Uses the shipped attacker and base and a shadow LoRA from the population cache (or, if there is
none, a LoRA fine-tuned on the first example face). Prints the best-of-N wall time of each part
and of the whole attack, next to the same 4 images sampled from the base model alone (the cost
the attack adds on top of plain sampling).
"""

from __future__ import annotations

import argparse
import time

import torch

from core import ASSETS
from core.attack.attacker import ATTACK_SAMPLER_STEPS, ATTACK_W, load_attacker
from core.attack.baselines import extrapolate
from core.finetune.lora import pipeline_with_lora
from core.model.pipeline import load_pipeline, sample_images


def best(fn, n):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), out


def a_lora(pipe):
    from core.attack.shadow import list_shadows, load_shadow

    files = list_shadows()
    if files:
        s = load_shadow(files[-1])
        return s.checkpoints[max(s.checkpoints)], max(s.checkpoints)
    from core.events import drain
    from core.faces.ingest import ingest_face
    from core.finetune.lora import FinetuneConfig, finetune

    photos = [ingest_face(p.read_bytes()).crop for p in sorted((ASSETS / "examples" / "person_1000").glob("*.png"))[:5]]
    return drain(finetune(pipe, photos, FinetuneConfig(checkpoint_every=0, preview_n=0))).lora, 80


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    pipe = load_pipeline(None)
    attacker, _ = load_attacker()
    lora, step = a_lora(pipe)
    t_enc, z = best(lambda: attacker.encode([lora], [step]), a.repeats)
    t_merge, view = best(lambda: pipeline_with_lora(pipe, lora), a.repeats)
    emb = z.expand(4, -1, -1)
    t_sample, _ = best(
        lambda: extrapolate(pipe, view, emb, ATTACK_W, seeds=[0, 1, 2, 3], steps=ATTACK_SAMPLER_STEPS), a.repeats
    )
    t_base, _ = best(lambda: sample_images(pipe, n=4, seed=0, steps=ATTACK_SAMPLER_STEPS), a.repeats)
    total = t_enc + t_merge + t_sample
    print(
        f"threads {torch.get_num_threads()}, best of {a.repeats}, 4 images x {ATTACK_SAMPLER_STEPS} sampler steps "
        f"extrapolated with w = {ATTACK_W:g} (base and LoRA model each step)"
    )
    print(f"encoder {t_enc * 1000:.0f} ms, merge LoRA {t_merge * 1000:.0f} ms, sampling {t_sample * 1000:.0f} ms")
    print(
        f"whole attack: {total:.2f} s (target <= 1 s); base-model sampling of the same 4 images alone: {t_base:.2f} s"
    )


if __name__ == "__main__":
    main()
