"""The shadow population: LoRAs the attacker fine-tunes itself on public photos of *other* people.

The attacker knows the recipe (``METHODS.md`` section 1), so it runs the visitor's own recipe
(:mod:`core.finetune.lora`: fresh trigger, seed and photo subset per LoRA) on the shadow identities and
keeps what attacker training needs: the LoRA at every ``record_every`` steps of its trajectory
(each is a training sample with its step token; with the constant learning rate, the checkpoint at
step r of a long run *is* the LoRA an r-step run would have made, so one trajectory covers every step
count) and the scaled VAE latents of the photos (what the denoising loss is computed on).

Speed: :func:`train_many` trains K LoRAs at once on the shared frozen base. Their adapters are
stacked along a new leading axis and one ``torch.func.vmap`` over ``functional_call`` runs all K
in one batched forward/backward (frozen layers see a K times larger batch; the adapters become
batched matmuls / grouped convolutions). Each LoRA keeps its own random stream, gradient clipping
and (elementwise, hence separable) AdamW state, so LoRA k is the LoRA ``finetune(crops_k,
seed=seeds[k])`` would make, up to float rounding (tests/test_shadow.py checks it).
``bench/shadow_speed.py`` measures LoRAs per CPU-hour against one-at-a-time ``finetune``.

CLI: ``python -m core.attack.shadow --n 96`` (resumable: finished groups are skipped). Under
``accelerate launch`` the groups are shared between processes / GPUs / machines (accelerate's
process index and count; tests/test_shadow.py checks the sharding; no multi-GPU run yet).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import tyro

from core.events import Done, Message, Progress, never
from core.finetune.lora import FinetuneConfig, check_photos, encode_photos
from core.model.prior import base_fingerprint, cache_dir


def shadow_dir() -> Path:
    return cache_dir() / "shadow"


def train_many(
    pipe, crops_list, cfg: FinetuneConfig | None = None, seeds=None, record_every: int = 0, should_stop=never
):
    """Generator: fine-tune ``len(crops_list)`` LoRAs at once (``cfg`` is every run's recipe, seed
    ``seeds[k]`` for run k) in one :class:`core.finetune.batch.LoRABatch`. Yields ``Progress`` per
    step and ``Done(dict)`` with ``triggers``, ``losses`` (steps x K) and ``trajectory``:
    ``{step: [lora_0, ..., lora_{K-1}]}`` at every ``record_every`` steps and the last step."""
    from core.finetune.batch import LoRABatch

    cfg = cfg or FinetuneConfig()
    if cfg.text_encoder:
        raise ValueError("train_many trains UNet LoRAs only (text_encoder=False)")
    crops_list = [check_photos(c) for c in crops_list]
    seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(len(crops_list))]
    if len(seeds) != len(crops_list):
        raise ValueError(f"{len(crops_list)} photo sets but {len(seeds)} seeds")
    t0 = time.perf_counter()
    batch = LoRABatch(pipe, cfg)
    runs = [batch.add(k, c, replace(cfg, seed=int(s), trigger=None)) for k, (c, s) in enumerate(zip(crops_list, seeds))]
    triggers = [r.trigger for r in runs]
    yield Message(f"{len(runs)} LoRAs at once; triggers {', '.join(triggers)}")
    losses, trajectory = [], {}
    for step in range(1, cfg.steps + 1):
        if should_stop():
            break
        batch.step()
        losses.append([r.losses[-1][0] for r in runs])
        yield Progress(
            "shadow LoRAs", step, cfg.steps, time.perf_counter() - t0, {"mean loss": float(np.mean(losses[-1]))}
        )
        if (record_every and step % record_every == 0) or step == cfg.steps:
            trajectory[step] = [r.lora() for r in runs]
    yield Done(
        {
            "triggers": triggers,
            "losses": losses,
            "trajectory": trajectory,
            "seeds": seeds,
            "base": base_fingerprint(pipe),
            "seconds": time.perf_counter() - t0,
        },
        cancelled=len(losses) < cfg.steps,
    )


# the population on disk -----------------------------------------------------------------------


@dataclass
class ShadowJob:
    name: str  # identity
    photos: list[str]  # the photo subset this LoRA saw (file names)
    seed: int


def plan_jobs(n: int, seed: int = 0, photos: int = 5, root=None) -> list[ShadowJob]:
    """``n`` shadow LoRAs: identities of the shadow split in a seeded order (cycling if n exceeds
    them), each with a random subset of up to ``photos`` of its photos and a fresh seed."""
    from core.faces.data import Split

    people = Split.load().paths("shadow", root)
    rng = random.Random(seed)
    names = shadow_order(rng, people)
    jobs = []
    for i in range(n):
        name = names[i % len(names)]
        paths = people[name]
        pick = sorted(rng.sample(range(len(paths)), min(photos, len(paths))))
        jobs.append(ShadowJob(name, [paths[j].name for j in pick], seed=1_000_000 + seed * 100_000 + i))
    return jobs


def shadow_order(rng: random.Random | int = 0, people: dict | None = None) -> list[str]:
    """The shadow identities in the plan's seeded order (job i of a plan is identity i of this list):
    a plan of n jobs uses the first n; identities after them are ones its attacker never saw."""
    from core.faces.data import Split

    rng = random.Random(rng) if isinstance(rng, int) else rng
    names = sorted(people if people is not None else Split.load().shadow)
    rng.shuffle(names)
    return names


def job_file(out: Path, i: int) -> Path:
    return out / f"{i:05d}.safetensors"


def trajectory_tensors(trajectory: dict, k: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Run ``k``'s checkpoints of a :func:`train_many` trajectory as ``step<r>.<key>`` file tensors."""
    return {
        f"step{step}.{key}": v.to(dtype).contiguous()
        for step, loras in trajectory.items()
        for key, v in loras[k].items()
    }


def read_trajectory(handle) -> dict[int, dict]:
    """``{step: peft-named state dict (float32)}`` from an open ``safe_open`` handle of such a file."""
    ck: dict[int, dict] = {}
    for key in handle.keys():
        if key.startswith("step"):
            head, rest = key.split(".", 1)
            ck.setdefault(int(head[4:]), {})[rest] = handle.get_tensor(key).float()
    return ck


def save_shadow(
    path: Path,
    job: ShadowJob,
    trigger: str,
    latents: torch.Tensor,
    trajectory: dict,
    k: int,
    cfg: FinetuneConfig,
    base: str,
) -> None:
    """One shadow LoRA: photo latents and every recorded checkpoint (fp16), metadata as JSON."""
    from safetensors.torch import save_file

    tensors = {"latents": latents.half().contiguous(), **trajectory_tensors(trajectory, k, torch.float16)}
    meta = {
        "identity": job.name,
        "photos": json.dumps(job.photos),
        "seed": str(job.seed),
        "trigger": trigger,
        "steps": json.dumps(sorted(trajectory)),
        "rank": str(cfg.rank),
        "alpha": str(cfg.alpha),
        "base": base,
        "config": json.dumps({k2: v for k2, v in vars(cfg).items() if k2 != "unet_targets"}),
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


@dataclass
class ShadowLoRA:
    """A shadow LoRA read back: ``checkpoints[step]`` is a peft-named state dict (float32)."""

    identity: str
    trigger: str
    seed: int
    latents: torch.Tensor
    checkpoints: dict
    meta: dict


def load_shadow(path: str | Path) -> ShadowLoRA:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        latents = f.get_tensor("latents").float()
        ck = read_trajectory(f)
    return ShadowLoRA(meta["identity"], meta["trigger"], int(meta["seed"]), latents, ck, meta)


def list_shadows(out: str | Path | None = None) -> list[Path]:
    return sorted(Path(out or shadow_dir()).glob("*.safetensors"))


def build_population(
    pipe,
    jobs: list[ShadowJob],
    cfg: FinetuneConfig,
    out: Path,
    group: int = 16,
    record_every: int = 5,
    root=None,
    process_index: int = 0,
    num_processes: int = 1,
    should_stop=never,
):
    """Generator: train every job not yet on disk, ``group`` at a time; this process takes every
    ``num_processes``-th group. Yields the groups' events and ``Done(list of files written)``."""
    from core.faces.aligned import load_crops
    from core.faces.data import default_lfw_root
    from core.model.pipeline import image_size_of

    out.mkdir(parents=True, exist_ok=True)
    root = Path(root or default_lfw_root())
    groups = [list(range(s, min(s + group, len(jobs)))) for s in range(0, len(jobs), group)]
    mine = [g for gi, g in enumerate(groups) if gi % num_processes == process_index]
    written = []
    for gi, g in enumerate(mine):
        todo = [i for i in g if not job_file(out, i).exists()]
        if not todo:
            continue
        if should_stop():
            break
        yield Message(f"group {gi + 1}/{len(mine)}: shadow LoRAs {todo[0]}..{todo[-1]}")
        crops = [load_crops([root / jobs[i].name / p for p in jobs[i].photos], size=image_size_of(pipe)) for i in todo]
        res = None
        for ev in train_many(pipe, crops, cfg, [jobs[i].seed for i in todo], record_every, should_stop):
            if isinstance(ev, Done):
                res = ev
            else:
                yield ev
        if res is None or res.cancelled:
            break
        r = res.result
        for k, i in enumerate(todo):
            save_shadow(
                job_file(out, i),
                jobs[i],
                r["triggers"][k],
                encode_photos(pipe, crops[k]).cpu(),
                r["trajectory"],
                k,
                cfg,
                r["base"],
            )
            written.append(job_file(out, i))
    yield Done(written)


@dataclass
class Args(FinetuneConfig):
    """Train the shadow LoRA population (resumable; several processes under accelerate share it)."""

    steps: int = 100  # fine-tuning steps of each shadow LoRA (past the default 80: covers every step count up to it)
    n: int = 96  # number of shadow LoRAs
    out: str | None = None  # folder of the population (default: core.attack.shadow.shadow_dir())
    group: int = 16  # LoRAs trained at once (one batched forward)
    record_every: int = 5  # steps between trajectory checkpoints kept for the attacker
    plan_seed: int = 0  # seed of the plan (which identities, photos and LoRA seeds)
    data: str | None = None  # LFW root (default: $LEAKLAB_LFW or ../shared/data/lfw-deepfunneled)
    model: str | None = None  # base model folder or hub id (default: the embedded base)
    write_plan: str | None = None  # only write the job plan (identities, photos, seeds) to this JSON file
    plan: str | None = None  # train the jobs of this plan (from --write-plan) instead of planning
    # fixed per job or meaningless here
    seed: tyro.conf.Suppress[int] = 0
    trigger: tyro.conf.Suppress[str | None] = None
    checkpoint_every: tyro.conf.Suppress[int] = 0
    preview_n: tyro.conf.Suppress[int] = 0
    preview_steps: tyro.conf.Suppress[int] = 15


def main(argv=None):
    from accelerate import PartialState

    from core.cli import config_of, parse
    from core.events import run_with_progress_bar
    from core.model.pipeline import load_pipeline

    a = parse(Args, argv)
    cfg = config_of(a, FinetuneConfig)
    if a.plan:
        jobs = [ShadowJob(**j) for j in json.loads(Path(a.plan).read_text())]
    else:
        jobs = plan_jobs(a.n, a.plan_seed, root=a.data)
    if a.write_plan:
        Path(a.write_plan).write_text(json.dumps([asdict(j) for j in jobs], indent=0) + "\n")
        print(f"{len(jobs)} jobs -> {a.write_plan}")
        return
    # without a GPU, processes started by `accelerate launch --multi_gpu` / `torchrun` share the groups
    # over gloo (cpu=True: accelerate's own launcher for --cpu starts a single process)
    state = PartialState(cpu=not torch.cuda.is_available())
    # float32 weights on every device (training; autocast does the half-precision work on CUDA)
    pipe = load_pipeline(a.model, str(state.device) if state.device.type == "cuda" else None, dtype=torch.float32)
    out = Path(a.out or shadow_dir())
    files = run_with_progress_bar(
        build_population(
            pipe, jobs, cfg, out, a.group, a.record_every, a.data, state.process_index, state.num_processes
        )
    )
    print(f"{len(files)} shadow LoRAs written to {out} ({len(list_shadows(out))} there in all)")


if __name__ == "__main__":
    main()
