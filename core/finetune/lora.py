"""DreamBooth-LoRA fine-tuning: the visitor's side ("I trained a LoRA on my photos; I share only it").

Recipe (``METHODS.md`` section 1, scaled to the embedded model; every default is a
:class:`FinetuneConfig` field; steps / lr / batch were picked with ``bench/finetune_recipe.py`` on
victims the evaluation does not use, under the 15 s budget; see README for what was measured):
- a fresh random trigger word from the reserved set per run; instance prompt "a photo of <trigger> face";
- prior preservation: class images the base model drew itself (:mod:`core.model.prior`), class prompt
  "a photo of a face", loss weight 1;
- LoRA (peft) on the UNet attention projections, transformer projections / feed-forward and ResNet
  convolutions (``UNET_TARGETS``); optionally on the text encoder's q/v;
- speed: photo latents (and their mirror images) and prompt embeddings computed once; the
  instance and class halves of a step run as one batch; bf16 autocast on CPU.

:func:`finetune` is a generator of events (:mod:`core.events`): ``Progress`` every step (loss,
elapsed), ``Checkpoint`` (the LoRA state dict, in memory) and ``Preview`` (samples with the trigger)
every ``checkpoint_every`` steps, then ``Done(FinetuneResult)``. It stops between steps when
``should_stop()`` is true. The base pipeline is never modified: the LoRA lives on a copy of the UNet.

CLI: ``python -m core.finetune.lora PHOTOS... --out lora.safetensors``.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tyro

from core.events import Checkpoint, Done, Message, Preview, Progress, never
from core.model.denoising import Denoiser
from core.model.pipeline import cpu_layout, image_size_of, mixed_precision, plain_attention, private_view, sample_images
from core.model.prior import base_fingerprint, class_latents
from core.model.prompts import CLASS_PROMPT, instance_prompt, random_trigger

# Attention projections (the paper's place for LoRA) plus the transformer blocks' projections and
# feed-forward and the ResNet convolutions: attention alone barely moved this base model's faces
# (20 victims: 60 % beat the floor); with these, all 3 tuning victims beat it by a wider margin.
UNET_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
)
TEXT_TARGETS = ("q_proj", "v_proj")
MIN_PHOTOS, MAX_PHOTOS = 3, 10


@dataclass
class FinetuneConfig:
    rank: int = 4  # LoRA rank r of every adapted projection
    alpha: float = 4.0  # LoRA alpha; the update is (alpha / rank) * B @ A
    steps: int = 80  # optimisation steps (bench/finetune_recipe.py: 80 steps 2+2 fit the 15 s budget)
    lr: float = 3e-3  # AdamW learning rate (constant, like the reference recipe)
    seed: int = 0  # seeds LoRA init, noise, timesteps and (with trigger=None) the trigger
    unet_targets: tuple = UNET_TARGETS  # UNet module names (suffixes) that get a LoRA
    text_encoder: bool = False  # also LoRA on the text encoder's q_proj / v_proj
    prior_weight: float = 1.0  # weight of the class-image (prior preservation) loss
    n_class: int = 32  # class images drawn once per base model and cached
    batch: int = 2  # instance images per step (as many class images beside them)
    checkpoint_every: int = 20  # steps between Checkpoint (and Preview) events; 0 = none (80 steps: 20, 40, 60, 80)
    preview_n: int = 2  # preview images per checkpoint (0 = no previews)
    preview_steps: int = 15  # sampler steps of the previews
    trigger: str | None = None  # None = a fresh random reserved word
    grad_clip: float = 1.0  # clip the gradient's L2 norm to this (0 = no clipping)
    # bf16 autocast on this CPU: 194 ms/step against 171 in float32
    mixed_precision: bool | None = None  # None: half-precision autocast on CUDA only (bf16 was slower on this CPU)

    def __post_init__(self):
        self.unet_targets = tuple(self.unet_targets)
        if not 1 <= self.rank <= 256:
            raise ValueError(f"rank must be 1..256, got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if not 1 <= self.steps <= 100_000:
            raise ValueError(f"steps must be 1..100000, got {self.steps!r}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr!r}")
        if self.batch < 1 or self.n_class < 0 or self.checkpoint_every < 0 or self.prior_weight < 0:
            raise ValueError(
                f"batch >= 1, n_class >= 0, checkpoint_every >= 0, prior_weight >= 0; got "
                f"{self.batch!r}, {self.n_class!r}, {self.checkpoint_every!r}, {self.prior_weight!r}"
            )
        if not self.unet_targets:
            raise ValueError("unet_targets must name at least one module")


@dataclass
class FinetuneResult:
    lora: dict  # peft-named state dict with component prefix ("unet.<module>.lora_A.weight" ...), CPU float32
    trigger: str
    config: FinetuneConfig
    base: str  # fingerprint of the base weights
    losses: list = field(default_factory=list)
    seconds: float = 0.0
    steps_done: int = 0


# 1. inputs ------------------------------------------------------------------------------------


def check_photos(crops) -> list[np.ndarray]:
    crops = [np.asarray(c, dtype=np.uint8) for c in crops]
    if not MIN_PHOTOS <= len(crops) <= MAX_PHOTOS:
        raise ValueError(f"a fine-tune needs {MIN_PHOTOS} to {MAX_PHOTOS} photos of one subject, got {len(crops)}")
    shapes = {c.shape for c in crops}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"photos must be equal-size RGB crops, got shapes {sorted(shapes)}")
    return crops


@torch.no_grad()
def encode_photos(pipe, crops) -> torch.Tensor:
    """Scaled latents (posterior means) of the crops and of their mirror images: 2N x C x h x w."""
    size = image_size_of(pipe)
    if crops[0].shape[:2] != (size, size):
        raise ValueError(
            f"photos are {crops[0].shape[1]}x{crops[0].shape[0]} px but this model draws {size} px: "
            f"align them at {size} px (core.faces.ingest.ingest_face(..., size={size}))"
        )
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    x = cpu_layout(torch.cat([x, x.flip(-1)]).to(pipe.device, pipe.vae.dtype))  # ~10 % faster on a CPU
    return (pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor).float().contiguous()


def encode_prompt(pipe, text: str, text_encoder=None) -> torch.Tensor:
    tok = pipe.tokenizer
    ids = tok(
        [text], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return (text_encoder or pipe.text_encoder)(ids.to(pipe.device))[0]


# 2. LoRA --------------------------------------------------------------------------------------


def lora_config(cfg: FinetuneConfig, targets=None):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=list(targets or cfg.unet_targets)
    )


def lora_state_dict(unet, text_encoder=None) -> dict:
    """The adapters' weights, detached CPU float32 copies, in peft naming with a component prefix:
    ``unet.<module>.lora_A.weight`` (A: r x in) and ``...lora_B.weight`` (B: out x r). This is the
    in-memory form everywhere in ``core``; files use diffusers' naming (:func:`save_lora`)."""
    from peft.utils import get_peft_model_state_dict

    out = {}
    for part, m in (("unet", unet), ("text_encoder", text_encoder)):
        if m is not None:
            out.update(
                {f"{part}.{k}": v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(m).items()}
            )
    return out


def split_components(lora: dict) -> dict[str, dict]:
    """{"unet": {...}, "text_encoder": {...}} without the prefixes (empty parts left out)."""
    parts: dict[str, dict] = {}
    for k, v in lora.items():
        part, rest = k.split(".", 1)
        parts.setdefault(part, {})[rest] = v
    return parts


# 3. the fine-tune -----------------------------------------------------------------------------


def pick_trigger(cfg: FinetuneConfig) -> str:
    """The run's trigger word: the configured one, else a reserved word drawn from the seed."""
    return cfg.trigger or random_trigger(random.Random(cfg.seed))


def trainable_copies(pipe, cfg: FinetuneConfig):
    """(UNet, text encoder or None, their trainable parameters): copies of the base's modules with fresh
    LoRA adapters (drawn from ``cfg.seed``), the adapters in float32. The shared base stays untouched."""
    torch.manual_seed(cfg.seed)
    unet = copy.deepcopy(pipe.unet).requires_grad_(False)
    unet.add_adapter(lora_config(cfg))
    if pipe.device.type == "cpu":
        plain_attention(unet)  # faster than SDPA for this training step on CPU (core.model.pipeline)
    te = None
    if cfg.text_encoder:
        te = copy.deepcopy(pipe.text_encoder).requires_grad_(False)
        te.add_adapter(lora_config(cfg, TEXT_TARGETS))
    params = [p for m in (unet, te) if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return unet, te, params


def adamw(params, lr: float) -> torch.optim.AdamW:
    """The fine-tune's optimizer: AdamW without weight decay, fused (one kernel over all of a LoRA's
    tensors): on CUDA the loop is launch-bound, and on a CPU a rank-4 LoRA's 212 tensors step in
    0.90 ms instead of torch's default per-tensor loop's 5.08 ms (one core, ``python -m
    bench.live_work --sections 6``; the same numbers up to float rounding), which a room of
    visitors pays once per visitor and step."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)


def finetune(pipe, crops, cfg: FinetuneConfig | None = None, should_stop=never):
    """Generator: DreamBooth-LoRA fine-tune of ``pipe`` (not modified) on 64 px face ``crops``."""
    cfg = cfg or FinetuneConfig()
    crops = check_photos(crops)
    t0 = time.perf_counter()
    trigger = pick_trigger(cfg)
    dev = pipe.device

    # 1. inputs computed once
    inst = encode_photos(pipe, crops)
    cls = class_latents(pipe, cfg.n_class).to(dev) if cfg.prior_weight > 0 and cfg.n_class > 0 else None
    yield Message(f"trigger word: {trigger}; {len(crops)} photos; {0 if cls is None else len(cls)} class images")

    # 2. trainable copies (the shared base stays untouched)
    unet, te, params = trainable_copies(pipe, cfg)
    opt = adamw(params, cfg.lr)
    den = Denoiser(pipe.scheduler.config)
    with torch.no_grad():
        emb_inst = encode_prompt(pipe, instance_prompt(trigger))
        emb_cls = encode_prompt(pipe, CLASS_PROMPT)
    g = torch.Generator().manual_seed(cfg.seed)
    view = private_view(pipe)
    view.unet = unet
    if te is not None:
        view.text_encoder = te

    # 3. steps
    amp = cfg.mixed_precision if cfg.mixed_precision is not None else dev.type == "cuda"
    losses = []
    for step in range(1, cfg.steps + 1):
        if should_stop():
            break
        unet.train()
        idx = torch.randint(0, len(inst), (cfg.batch,), generator=g)
        x0 = inst[idx]
        embs = [emb_inst.expand(cfg.batch, -1, -1)]
        if cls is not None:
            x0 = torch.cat([x0, cls[torch.randint(0, len(cls), (cfg.batch,), generator=g)]])
            embs.append(emb_cls.expand(cfg.batch, -1, -1))
        if te is not None:
            te.train()
            embs = [encode_prompt(pipe, instance_prompt(trigger), te).expand(cfg.batch, -1, -1)] + (
                [encode_prompt(pipe, CLASS_PROMPT, te).expand(cfg.batch, -1, -1)] if cls is not None else []
            )
        noised = den.noise(x0, g)
        with mixed_precision(pipe.device, amp):
            pred = unet(noised.noisy, noised.t, torch.cat(embs)).sample
        err = den.errors(pred, noised)
        loss_inst = err[: cfg.batch].mean()
        loss = loss_inst + (cfg.prior_weight * err[cfg.batch :].mean() if cls is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        loss = float(loss.detach())
        losses.append(loss)
        yield Progress(
            "fine-tune",
            step,
            cfg.steps,
            time.perf_counter() - t0,
            {"loss": loss, "instance_loss": float(loss_inst.detach())},
        )
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            unet.eval()
            yield Checkpoint(step, lora_state_dict(unet, te))
            if cfg.preview_n:
                ims = sample_images(view, instance_prompt(trigger), n=cfg.preview_n, seed=0, steps=cfg.preview_steps)
                yield Preview(step, ims, f"the LoRA's own samples with its trigger, step {step}")
    unet.eval()
    result = FinetuneResult(
        lora_state_dict(unet, te), trigger, cfg, base_fingerprint(pipe), losses, time.perf_counter() - t0, len(losses)
    )
    yield Done(result, cancelled=len(losses) < cfg.steps)


# 4. using and sharing a LoRA ------------------------------------------------------------------


def pipeline_with_lora(pipe, lora: dict, alpha: float | None = None):
    """A pipeline view whose UNet (and text encoder) are copies of the base's with ``lora`` merged
    in: W + (alpha / r) B A (alpha defaults to r). The base pipeline is not modified."""
    view = private_view(pipe)
    for part, sub in split_components(lora).items():
        module = copy.deepcopy(getattr(pipe, part))
        merge_lora_(module, sub, alpha)
        setattr(view, part, module)
    return view


@torch.no_grad()
def merge_lora_(module, sub: dict, alpha: float | None = None) -> None:
    """Add (alpha / r) B A to every weight (linear or conv) named in a peft-format LoRA dict (no prefix)."""
    names = {k.rsplit(".lora_A.weight", 1)[0] for k in sub if k.endswith(".lora_A.weight")}
    mods = dict(module.named_modules())
    for n in names:
        a, b = sub[f"{n}.lora_A.weight"].float(), sub[f"{n}.lora_B.weight"].float()
        r = a.shape[0]
        scale = (alpha if alpha is not None else r) / r
        lin = mods[n]
        # Linear: B (out, r) @ A (r, in). Conv: B is (out, r, 1, 1), A (r, in, kh, kw): same product flattened.
        delta = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
        lin.weight += (scale * delta).to(lin.weight.dtype).to(lin.weight.device).view_as(lin.weight)


def save_lora(path: str | Path, result: FinetuneResult, base_name: str = "embedded") -> Path:
    """Write the LoRA as one diffusers-format ``.safetensors`` file (loadable by any
    ``StableDiffusionPipeline.load_lora_weights``). The trigger is deliberately NOT stored."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    path = Path(path)
    cfg = result.config
    # diffusers reads the adapter config (rank, alpha, targets) from this metadata key
    unet_meta = {"r": cfg.rank, "lora_alpha": cfg.alpha, "target_modules": list(cfg.unet_targets)}
    ours = {
        "leaklab_base_model": base_name,
        "leaklab_base_fingerprint": result.base,
        "leaklab_rank": str(cfg.rank),
        "leaklab_alpha": str(cfg.alpha),
        "leaklab_steps": str(result.steps_done),
        "leaklab_format": "diffusers-lora-v1",
    }

    def save_function(weights, filename):
        meta = {
            "format": "pt",
            "lora_adapter_metadata": json.dumps(
                {
                    **{f"unet.{k}": v for k, v in unet_meta.items()},
                    **(
                        {f"text_encoder.{k}": v for k, v in {**unet_meta, "target_modules": list(TEXT_TARGETS)}.items()}
                        if cfg.text_encoder
                        else {}
                    ),
                },
                sort_keys=True,
            ),
            **ours,
        }
        save_file({k: v.contiguous() for k, v in weights.items()}, filename, metadata=meta)

    from diffusers.utils import convert_state_dict_to_diffusers

    # UNet in peft naming ("<module>.lora_A.weight"), which load_lora_weights reads as is: the
    # older "lora.down/up" naming is misread by diffusers' loader once convolution LoRAs sit beside
    # attention ones (it silently dropped every attention LoRA; tests/test_finetune.py). The text
    # encoder part stays in diffusers naming, the only one its loader infers.
    parts = split_components(result.lora)
    unet_sd = parts["unet"]
    te_sd = convert_state_dict_to_diffusers(parts["text_encoder"]) if "text_encoder" in parts else None
    StableDiffusionPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=unet_sd,
        text_encoder_lora_layers=te_sd,
        weight_name=path.name,
        save_function=save_function,
    )
    return path


def load_lora(path: str | Path) -> tuple[dict, dict]:
    """(peft-format state dict, metadata) of a LoRA file written by :func:`save_lora` (no
    validation here: untrusted files go through a validator first)."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    raw = load_file(str(path))
    out = {}
    for part, sub in split_components(raw).items():
        convert = convert_unet_state_dict_to_peft if part == "unet" else convert_state_dict_to_peft
        out.update({f"{part}.{k}": v.float() for k, v in convert(sub).items()})
    return out, meta


# 5. CLI ---------------------------------------------------------------------------------------


@dataclass
class Args(FinetuneConfig):
    """Fine-tune a DreamBooth LoRA on 3-10 photos of one face and write it as a LoRA file."""

    photos: tyro.conf.Positional[tuple[str, ...]] = ()  # 3-10 photo files of one face
    out: str = "lora.safetensors"  # LoRA file to write (.safetensors, loadable by diffusers' load_lora_weights)
    model: str | None = None  # base model folder or hub id (default: the embedded base)
    device: str | None = None  # torch device (default: CUDA when present)


def main(argv=None):
    from core.cli import config_of, parse
    from core.events import run_with_progress_bar
    from core.faces.ingest import IngestError, ingest_face
    from core.model.pipeline import load_pipeline

    a = parse(Args, argv)
    cfg = config_of(a, FinetuneConfig)
    pipe = load_pipeline(a.model, a.device)
    crops = []
    for p in a.photos:
        try:
            crops.append(ingest_face(p, size=image_size_of(pipe)).crop)
        except IngestError as e:
            print(f"skipped {p}: {e}")
    result = run_with_progress_bar(finetune(pipe, crops, cfg))
    save_lora(a.out, result, base_name=a.model or "embedded")
    print(f"LoRA -> {a.out}  (trigger word, kept out of the file: {result.trigger})")
    print(f'prompt to use it: "{instance_prompt(result.trigger)}"')


if __name__ == "__main__":
    main()
