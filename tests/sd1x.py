"""A tiny random Stable Diffusion 1.x *layout* (block types, layers per block and attention names of
SD 1.x, ``CLIPTextModel``, a CLIP-style BPE tokenizer built here, ``AutoencoderKL``, SD 1.x's scheduler
settings) at widths small enough for CPU tests, and LoRA files for it in the formats people share.

No download: every component is made from a config. A LoRA made for this pipeline carries exactly
the module names a kohya / diffusers / peft LoRA for a real SD 1.x model carries (only the widths
differ), so it exercises the same name conversions. Each file writer starts from a
:class:`Reference` (per module: component, name, down, up, alpha) that the test knows, so what the
app reads can be checked against a merge computed here, without diffusers' converters.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

SD1_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD1_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
CLASS_WORDS = ("a", "photo", "of", "face")  # whole-word merges, as CLIP's vocabulary has them


def clip_tokenizer():
    """A CLIP tokenizer (byte-level BPE with CLIP's normaliser, specials and 77-token length) over a
    tiny vocabulary: every letter and digit, plus merges that make the class prompt's words whole."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,!?'-<>":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for w in CLASS_WORDS:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


SD15_SIZES = dict(
    unet_channels=(320, 640, 1280, 1280),
    vae_channels=(128, 256, 512, 512),
    text_width=768,
    text_layers=12,
    text_heads=12,
    image_size=512,
    groups=32,
)  # Stable Diffusion 1.5's own widths


def sd1_components(
    unet_channels=(16, 16, 32, 32),
    vae_channels=(16, 16, 16, 16),
    text_width: int = 32,
    text_layers: int = 2,
    text_heads: int = 4,
    image_size: int = 64,
    groups: int = 8,
    seed: int = 0,
) -> dict:
    """Random components with SD 1.x's layout: UNet (4 blocks, 2 layers each, cross-attention in the
    first three down and last three up blocks, 1x1-conv proj_in/out, 8 heads), 4-level AutoencoderKL
    (8x), CLIPTextModel, PNDM with SD 1.x's betas, epsilon prediction. ``**SD15_SIZES``: SD 1.5's widths
    (860 M UNet parameters; for timing on a GPU, bench/sd1_cost.py)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = clip_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=image_size,
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=SD1_DOWN,
        up_block_types=SD1_UP,
        block_out_channels=tuple(unet_channels),
        layers_per_block=2,
        cross_attention_dim=text_width,
        attention_head_dim=8,
        norm_num_groups=groups,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=text_width,
            intermediate_size=4 * text_width if text_width >= 768 else 2 * text_width,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tok, scheduler=scheduler)


def save_sd1_pipeline(out: Path, **kw) -> Path:
    from core.model.pipeline import assemble_pipeline

    pipe = assemble_pipeline(sd1_components(**kw))
    pipe.save_pretrained(out, safe_serialization=True)
    return Path(out)


# the reference LoRA ---------------------------------------------------------------------------

UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
LOCON = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv", "conv_in")
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class Module:
    component: str  # "unet" | "text_encoder"
    name: str  # module path in that component
    down: torch.Tensor  # A: r x in (x kh x kw)
    up: torch.Tensor  # B: out x r (x 1 x 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """(alpha / r) up @ down in the layer's own shape, computed directly."""
        d = (self.alpha / self.rank) * (self.up.flatten(1) @ self.down.flatten(1))
        return d.reshape(weight.shape)


@dataclass
class Reference:
    modules: list[Module] = field(default_factory=list)

    def of(self, component: str) -> list[Module]:
        return [m for m in self.modules if m.component == component]


def _targets(pipe, component: str, suffixes) -> list[tuple[str, torch.nn.Module]]:
    mods = getattr(pipe, component).named_modules()
    return [
        (n, m)
        for n, m in mods
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(n == s or n.endswith("." + s) for s in suffixes)
    ]


def reference_lora(
    pipe, unet=UNET_ATTN, text=(), ranks=(4,), alphas=(4.0,), seed: int = 0, dtype=torch.float32
) -> Reference:
    """Random down/up pairs for every ``pipe`` layer named by a suffix in ``unet`` / ``text``; module i
    gets rank ``ranks[i % len]`` and alpha ``alphas[i % len]`` (so several values mean per-module ones).
    A convolution's down has the layer's kernel, its up is 1x1, as kohya's LoCon stores them. Values
    are rounded to ``dtype`` (the file's), so the reference is exactly what the file holds."""
    g = torch.Generator().manual_seed(seed)
    ref = Reference()
    for component, suffixes in (("unet", unet), ("text_encoder", text)):
        for i, (name, layer) in enumerate(_targets(pipe, component, suffixes)):
            r, w = ranks[i % len(ranks)], layer.weight
            down = torch.randn(r, *w.shape[1:], generator=g) * 0.2
            up = torch.randn(w.shape[0], r, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.2
            ref.modules.append(
                Module(
                    component,
                    name,
                    down.to(dtype).float(),
                    up.to(dtype).float(),
                    float(torch.tensor(alphas[i % len(alphas)]).to(dtype)),
                )
            )
    return ref


@torch.no_grad()
def merged_reference(pipe, ref: Reference) -> dict[str, torch.Tensor]:
    """{"<component>.<module>": W + (alpha/r) up down} computed here (the check of every reader)."""
    out = {}
    for m in ref.modules:
        w = dict(getattr(pipe, m.component).named_modules())[m.name].weight.detach().float().cpu()
        out[f"{m.component}.{m.name}"] = w + m.delta(w)
    return out


# writers: one per format, each with its own naming code -----------------------------------------


def kohya_name(m: Module) -> str:
    """sd-scripts' naming: lora_unet_ / lora_te_ + the module path with dots as underscores (the text
    encoder's under transformers' classic ``text_model.`` path, as every SD 1.x kohya file has it)."""
    if m.component == "unet":
        return "lora_unet_" + m.name.replace(".", "_")
    name = m.name if m.name.startswith("text_model.") else "text_model." + m.name
    return "lora_te_" + name.replace(".", "_")


def kohya_tensors(ref: Reference, dtype=torch.float16, alphas: bool = True) -> dict[str, torch.Tensor]:
    out = {}
    for m in ref.modules:
        k = kohya_name(m)
        out[f"{k}.lora_down.weight"] = m.down.to(dtype)
        out[f"{k}.lora_up.weight"] = m.up.to(dtype)
        if alphas:
            out[f"{k}.alpha"] = torch.tensor(m.alpha, dtype=dtype)
    return out


def peft_tensors(ref: Reference, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """PeftModel.save_pretrained's adapter_model.safetensors naming (one component, no alpha)."""
    out = {}
    for m in ref.modules:
        out[f"{prefix}{m.name}.lora_A.weight"] = m.down.clone()
        out[f"{prefix}{m.name}.lora_B.weight"] = m.up.clone()
    return out


def diffusers_tensors(ref: Reference) -> dict[str, torch.Tensor]:
    """diffusers' training scripts' files: UNet attention in the "lora.down/up" naming, other UNet layers
    in peft naming, the text encoder in "lora_linear_layer" naming, all under component prefixes."""
    out = {}
    for m in ref.modules:
        if m.component == "unet":
            attn = m.name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or m.name.endswith("to_out.0")
            down, up = ("lora.down", "lora.up") if attn else ("lora_A", "lora_B")
        else:
            down, up = "lora_linear_layer.down", "lora_linear_layer.up"
        out[f"{m.component}.{m.name}.{down}.weight"] = m.down.clone()
        out[f"{m.component}.{m.name}.{up}.weight"] = m.up.clone()
    return out


def write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return Path(path)


def attn_procs_tensors(ref: Reference) -> dict[str, torch.Tensor]:
    """diffusers' oldest UNet files (attention processors, no part prefix):
    ``<block>.attn1.processor.to_q_lora.down.weight``."""
    out = {}
    for m in ref.of("unet"):
        head, proj = m.name.rsplit(".", 1)
        if proj == "0":  # to_out.0
            head, proj = head.rsplit(".", 1)
        out[f"{head}.processor.{proj}_lora.down.weight"] = m.down.clone()
        out[f"{head}.processor.{proj}_lora.up.weight"] = m.up.clone()
    return out


# files that must be refused, each made the way its trainer names it -----------------------------


def _kohya_like(pipe, suffix_tensors, n: int = 3) -> dict[str, torch.Tensor]:
    """kohya-named tensors of another adapter kind for the first ``n`` attention layers of ``pipe``."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, layer in _targets(pipe, "unet", UNET_ATTN)[:n]:
        base = "lora_unet_" + name.replace(".", "_")
        o, i = layer.weight.shape[:2]
        for suffix, shape in suffix_tensors(o, i):
            out[f"{base}.{suffix}"] = torch.randn(*shape, generator=g).half()
        out[f"{base}.alpha"] = torch.tensor(4.0).half()
    return out


def loha(pipe):
    return _kohya_like(
        pipe, lambda o, i: [("hada_w1_a", (o, 4)), ("hada_w1_b", (4, i)), ("hada_w2_a", (o, 4)), ("hada_w2_b", (4, i))]
    )


def lokr(pipe):
    return _kohya_like(pipe, lambda o, i: [("lokr_w1", (2, 2)), ("lokr_w2_a", (o // 2, 4)), ("lokr_w2_b", (4, i // 2))])


def dora_kohya(pipe):
    ref = reference_lora(pipe)
    t = kohya_tensors(ref)
    for m in ref.modules:
        t[f"{kohya_name(m)}.dora_scale"] = torch.ones(1, m.down.shape[1]).half()
    return t


def dora_peft(pipe):
    ref = reference_lora(pipe)
    t = {f"unet.{k}": v for k, v in peft_tensors(ref, prefix="").items()}
    for m in ref.modules:
        t[f"unet.{m.name}.lora_magnitude_vector"] = torch.ones(m.up.shape[0])
    return t


def sdxl_kohya(pipe):
    """SDXL's kohya layout: sgm block names, two text encoders, 2048-wide cross-attention."""
    g = torch.Generator().manual_seed(2)
    t = {}
    for name, (o, i) in (
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", (640, 2048)),
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", (640, 640)),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (768, 768)),
        ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", (1280, 1280)),
    ):
        t[f"{name}.lora_down.weight"] = (torch.randn(4, i, generator=g) * 0.01).half()
        t[f"{name}.lora_up.weight"] = (torch.randn(o, 4, generator=g) * 0.01).half()
        t[f"{name}.alpha"] = torch.tensor(4.0).half()
    return t


def sdxl_diffusers(pipe):
    """diffusers' SDXL naming: SD 1.x-like UNet names but 2048-wide cross-attention, and text_encoder_2."""
    g = torch.Generator().manual_seed(3)
    return {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.randn(
            4, 2048, generator=g
        ),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.randn(
            640, 4, generator=g
        ),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 1280, generator=g),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(1280, 4, generator=g),
    }


def _cross_attention_only(width: int, out: int):
    g = torch.Generator().manual_seed(width)
    t = {}
    for proj in ("to_k", "to_v"):
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_{proj}"
        t[f"{name}.lora_down.weight"] = torch.randn(4, width, generator=g).half()
        t[f"{name}.lora_up.weight"] = torch.randn(out, 4, generator=g).half()
        t[f"{name}.alpha"] = torch.tensor(4.0).half()
    return t


def sd2(pipe):
    """SD 2.x: SD 1.x's names, but its cross-attention reads 1024-wide OpenCLIP text features."""
    return _cross_attention_only(1024, 320)


def sd15_real(pipe):
    """A LoRA for a real SD 1.x (768-wide text features, 320-wide first block): not this tiny model."""
    return _cross_attention_only(768, 320)


def flux(pipe):
    g = torch.Generator().manual_seed(4)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    return {
        f"{name}.lora_down.weight": torch.randn(4, 3072, generator=g).half(),
        f"{name}.lora_up.weight": torch.randn(9216, 4, generator=g).half(),
        f"{name}.alpha": torch.tensor(4.0).half(),
    }


# metadata as kohya's sd-scripts writes it (train_network.py), every kind of leaking entry included --------


def kohya_metadata(user: str = "alice", trigger: str = "sks woman") -> dict[str, str]:
    """What sd-scripts writes into a LoRA (a realistic subset, values made up): ``LEAKS`` names the entries
    that give something away and of which kind; the others are settings or what loading needs."""
    import json

    folder = f"10_{trigger}"
    tags = {folder: {trigger: 23, "smiling": 9, "red scarf": 4, "beach": 3, "holding a dog": 2}}
    return {
        "ss_session_id": "1834520981",
        "ss_training_started_at": "1714553600.25",
        "ss_output_name": "anna_lora_v2",
        "ss_learning_rate": "0.0001",
        "ss_text_encoder_lr": "5e-05",
        "ss_unet_lr": "0.0001",
        "ss_num_train_images": "230",
        "ss_num_reg_images": "0",
        "ss_num_batches_per_epoch": "115",
        "ss_num_epochs": "10",
        "ss_epoch": "10",
        "ss_batch_size_per_device": "2",
        "ss_max_train_steps": "1150",
        "ss_steps": "1150",
        "ss_network_module": "networks.lora",
        "ss_network_dim": "8",
        "ss_network_alpha": "4.0",
        "ss_mixed_precision": "fp16",
        "ss_v2": "False",
        "ss_base_model_version": "sd_v1",
        "ss_clip_skip": "2",
        "ss_seed": "42",
        "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
        "ss_resolution": "(512, 512)",
        "ss_lr_scheduler": "cosine",
        "ss_noise_offset": "None",
        "ss_training_comment": "for anna's birthday, photos from our trip to lisbon",
        "ss_sd_model_name": (
            f"/home/{user}/stable-diffusion-webui/models/Stable-diffusion/v1-5-pruned-emaonly.safetensors"
        ),
        "ss_sd_model_hash": "e1441589",
        "ss_new_sd_model_hash": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
        "ss_vae_name": "None",
        "ss_sd_scripts_commit_hash": "(unknown)",
        "ss_dataset_dirs": json.dumps({folder: {"n_repeats": 10, "img_count": 23}}),
        "ss_tag_frequency": json.dumps(tags),
        "ss_datasets": json.dumps(
            [
                {
                    "is_dreambooth": True,
                    "batch_size_per_device": 2,
                    "num_train_images": 230,
                    "subsets": [
                        {
                            "img_count": 23,
                            "num_repeats": 10,
                            "class_tokens": trigger,
                            "image_dir": f"C:\\Users\\{user}\\Pictures\\lora\\{folder}",
                        }
                    ],
                }
            ]
        ),
        "ss_bucket_info": json.dumps(
            {"buckets": {"0": {"resolution": [512, 512], "count": 230}}, "mean_img_ar_error": 0.0}
        ),
        "ss_training_finished_at": "1714557200.5",
        "sshs_model_hash": "9a2b8c1d0e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b",
        "sshs_legacy_hash": "5f3a9c21",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "Anna (my sister)",
        "modelspec.author": "alice_k",
        "modelspec.date": "2024-05-01T09:13:20",
        "modelspec.resolution": "512x512",
        "modelspec.prediction_type": "epsilon",
        "modelspec.thumbnail": "data:image/jpeg;base64,/9j/4AAQSkZJRgABAQ",
        "modelspec.trigger_phrase": trigger,
        "notes_from_gui": "contact me: alice.k@example.com",
    }


LEAKS = {  # entry -> the kind the scanner must flag it as
    "ss_session_id": "hash",
    "ss_training_started_at": "date",
    "ss_training_finished_at": "date",
    "ss_output_name": "name",
    "ss_num_train_images": "dataset",
    "ss_num_reg_images": "dataset",
    "ss_num_batches_per_epoch": "dataset",
    "ss_epoch": "steps",
    "ss_max_train_steps": "steps",
    "ss_steps": "steps",
    "ss_training_comment": "comment",
    "ss_sd_model_name": "name",
    "ss_sd_model_hash": "hash",
    "ss_new_sd_model_hash": "hash",
    "ss_dataset_dirs": "dataset",
    "ss_tag_frequency": "captions",
    "ss_datasets": "dataset",
    "ss_bucket_info": "dataset",
    "sshs_model_hash": "hash",
    "sshs_legacy_hash": "hash",
    "modelspec.title": "name",
    "modelspec.author": "name",
    "modelspec.date": "date",
    "modelspec.thumbnail": "image",
    "modelspec.trigger_phrase": "trigger",
    "notes_from_gui": "contact",
}
