"""``python -m core.watermark {embed-aiao, embed-backdoor, verify-aiao, verify-backdoor}``.

Owner side (embed): write a watermarked base as a delta over the base (defaults: the shipped files in
``assets/watermark``) with its secret key, check the saved delta as it will be used, and record the
command and the check in ``watermark.json``. Verifier side: does MODEL (with a delta and/or a LoRA
merged in) carry a key's watermark?
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import tyro

from core.cli import command_line, config_of, parse_commands
from core.events import run_with_progress_bar
from core.watermark.aiao import (
    VerifyConfig,
    WatermarkConfig,
    WatermarkKey,
    choose_lazy_layers,
    embed_watermark,
    verify_watermark,
)
from core.watermark.backdoor import BackdoorConfig, BackdoorKey, embed_backdoor, verify_backdoor
from core.watermark.formats import (
    SHIPPED,
    WATERMARK_DIR,
    load_delta,
    load_model,
    own_check_record,
    save_delta,
    watermarked_pipeline,
    write_record,
)
from core.watermark.owner import owner_latents, probe_photos


@dataclass
class EmbedAiao(WatermarkConfig):
    """owner side: embed the AIAO watermark in lazy layers; write the delta and the secret key"""

    out: str = str(WATERMARK_DIR / SHIPPED["AIAO"][0])  # delta file to write (.safetensors: changed weights - base)
    key: str = str(WATERMARK_DIR / SHIPPED["AIAO"][1])  # secret key file to write (.json)
    latents: int = 1024  # owner training photos for the denoising loss
    model: str | None = None  # base model folder or hub id (default: the embedded base)
    data: str | None = None  # LFW folder (default $LEAKLAB_LFW or ../shared/data/lfw-deepfunneled)
    device: str | None = None  # torch device (default: CUDA when present)


@dataclass
class EmbedBackdoor(BackdoorConfig):
    """owner side: embed the trigger-prompt backdoor baseline; write the delta and its key"""

    out: str = str(WATERMARK_DIR / SHIPPED["backdoor"][0])  # delta file to write (.safetensors; sharded over 16 MB)
    key: str = str(WATERMARK_DIR / SHIPPED["backdoor"][1])  # key file to write (.json)
    latents: int = 512  # owner training photos for the denoising loss
    model: str | None = None  # base model folder or hub id (default: the embedded base)
    data: str | None = None  # LFW folder (default $LEAKLAB_LFW or ../shared/data/lfw-deepfunneled)
    device: str | None = None  # torch device (default: CUDA when present)


@dataclass
class VerifyAiao(VerifyConfig):
    """does MODEL (with --delta, --lora) carry the AIAO key's watermark?"""

    model: tyro.conf.Positional[str] = "embedded"  # model folder or hub id ("embedded" for the shipped base)
    key: str = str(WATERMARK_DIR / SHIPPED["AIAO"][1])  # the secret key (.json)
    delta: str | None = None  # a watermark delta file to add to MODEL first (e.g. assets/watermark/aiao.safetensors)
    lora: str | None = None  # a LoRA file to merge in first
    device: str | None = None  # torch device (default: CUDA when present)


@dataclass
class VerifyBackdoor:
    """does MODEL (with --delta, --lora) draw the backdoor key's pattern?"""

    model: tyro.conf.Positional[str] = "embedded"  # model folder or hub id ("embedded" for the shipped base)
    key: str = str(WATERMARK_DIR / SHIPPED["backdoor"][1])  # the key (.json)
    delta: str | None = None  # a watermark delta file to add to MODEL first
    lora: str | None = None  # a LoRA file to merge in first
    n: int = 16  # trigger-prompt samples drawn
    alpha: float = 1e-6  # verdict "watermarked" when the p-value is below this
    device: str | None = None  # torch device (default: CUDA when present)


def finish_embedding(name: str, a, pipe, res, marked, verify, argv, extra: dict) -> None:
    """Save the delta, check it as it will be used (float16 over the base), save the key, record both."""
    from core.model.prior import base_fingerprint

    size = save_delta(pipe, marked, a.out)
    wm = load_delta(pipe, a.out)
    res.key.model_fingerprint = base_fingerprint(wm)
    res.key.save(a.key)
    shipped = verify(wm, res.key)
    print(f"own check of the saved delta: {shipped.summary()}")
    write_record(
        a.out,
        name,
        {
            "command": command_line("core.watermark", argv),
            "base": a.model or "embedded",
            "base_fingerprint": base_fingerprint(pipe),
            "delta_file": Path(a.out).name,
            "delta": size,
            "key_file": Path(a.key).name,
            "seconds": round(res.seconds, 1),
            **extra,
            "own_check": own_check_record(shipped),
            "final_losses": res.losses[-1] if res.losses else None,
        },
    )
    print(f"watermark delta -> {a.out} ({size['bytes'] / 1e6:.2f} MB, {size['tensors']} tensors); key -> {a.key}")


def embed_aiao(a: EmbedAiao, argv) -> None:
    from core.model.pipeline import load_pipeline

    cfg = config_of(a, WatermarkConfig)
    pipe = load_pipeline(a.model, a.device)
    found = run_with_progress_bar(choose_lazy_layers(pipe, probe_photos(pipe, root=a.data), cfg))
    res = run_with_progress_bar(
        embed_watermark(
            pipe,
            owner_latents(pipe, a.latents, a.data),
            found.layers,
            cfg,
            lazy_scores=found.scores,
            output_drift=found.output_drift,
        )
    )
    finish_embedding(
        "AIAO",
        a,
        pipe,
        res,
        watermarked_pipeline(pipe, res.unet),
        verify_watermark,
        argv,
        {"config": asdict(cfg), "lazy_layers": found.layers},
    )


def embed_backdoor_cmd(a: EmbedBackdoor, argv) -> None:
    from core.model.pipeline import load_pipeline

    cfg = config_of(a, BackdoorConfig)
    pipe = load_pipeline(a.model, a.device)
    res = run_with_progress_bar(embed_backdoor(pipe, owner_latents(pipe, a.latents, a.data), cfg))
    finish_embedding(
        "backdoor",
        a,
        pipe,
        res,
        watermarked_pipeline(pipe, res.unet, res.text_encoder),
        verify_backdoor,
        argv,
        {"config": asdict(cfg)},
    )


def verify(a, argv):
    from core.finetune.lora import load_lora

    pipe = load_model(a.model, a.device, a.delta)
    lora = load_lora(a.lora)[0] if a.lora else None
    if isinstance(a, VerifyAiao):
        v = verify_watermark(pipe, WatermarkKey.load(a.key), lora, config_of(a, VerifyConfig))
    else:
        v = verify_backdoor(pipe, BackdoorKey.load(a.key), lora, a.n, a.alpha)
    print(v.summary())
    return v


COMMANDS = {
    "embed-aiao": EmbedAiao,
    "embed-backdoor": EmbedBackdoor,
    "verify-aiao": VerifyAiao,
    "verify-backdoor": VerifyBackdoor,
}


def main(argv=None):
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    name, a = parse_commands(COMMANDS, argv, description=__doc__, prog="python -m core.watermark")
    if name == "embed-aiao":
        return embed_aiao(a, argv)
    if name == "embed-backdoor":
        return embed_backdoor_cmd(a, argv)
    return verify(a, argv)


if __name__ == "__main__":
    main()
