"""The weight-only attacker: a variational network encoder that reads a LoRA and writes a prompt.

Paper design (Yao, arXiv 2409.08482; ``METHODS.md`` section 1), as built here:
- one small encoder per LoRA tensor -> one token each (:class:`TensorEncoder`);
- a learned *task* token sequence (here 16 query tokens, one per position of the prompt embedding
  they become) and a *fine-tuning-step* token (sinusoidal embedding of the step r, then an MLP);
- a transformer over [queries, step, tensor tokens]; linear heads on the query outputs give the
  mean and log-variance of z (a text-encoder-sized prompt embedding, L x D);
- no pixel decoder: z is the prompt embedding of the victim's *own* fine-tuned model (base + the
  LoRA under attack), which then samples the reconstruction.

Choices (measured in the ablation of ``docs/results/attack.md``):
- ``inputs="canonical"``: the encoder reads the LoRA update dW = (alpha/r) B A through its
  canonical factors U sqrt(S), V sqrt(S) (thin SVD via two QRs, sign fixed per component), which are
  invariant to LoRA's symmetry B A = (B M)(M^-1 A); ``inputs="raw"`` reads B and A as stored
  (the paper). No victim initial weights are needed either way.
- z = e(class prompt) + mu: the head predicts an offset from the class prompt's embedding, so an
  untrained attacker starts from the "naive" attack (the LoRA sampled with the class prompt).
- the tensor encoder is the paper's "rank axis as channels" network with one learned linear map
  along the tensor's long axis (a 1-D convolution whose kernel spans the axis), then a linear map to
  the token width.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from core import PROJECT_ROOT

ATTACKER_DIR = PROJECT_ROOT / "assets" / "attacker"


@dataclass
class AttackerConfig:
    modules: list = field(default_factory=list)  # UNet module names, in token order
    shapes: list = field(default_factory=list)  # (out, in_eff) of each module's dW
    rank: int = 4
    alpha: float = 4.0
    width: int = 128  # token width
    axis_width: int = 16  # features per rank component after the per-axis linear map
    layers: int = 3
    heads: int = 4
    text_len: int = 16  # z: text_len x text_dim (the prompt embedding shape of the base model)
    text_dim: int = 128
    inputs: str = "canonical"  # "canonical" (B A's symmetric-invariant factors) | "raw" (B and A)
    max_step: int = 1000  # step tokens are defined for 0..max_step
    base: str = ""  # fingerprint of the base model the attacker was trained for


def module_names(lora: dict) -> list[str]:
    """UNet module names (no prefix) carrying a LoRA, sorted."""
    return sorted(
        k[len("unet.") : -len(".lora_A.weight")] for k in lora if k.startswith("unet.") and k.endswith(".lora_A.weight")
    )


def factors(lora: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B as out x r, A as r x in_eff) of one module (convolutions flattened)."""
    a = lora[f"unet.{name}.lora_A.weight"].float()
    b = lora[f"unet.{name}.lora_B.weight"].float()
    return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)


def canonical_factors(b: torch.Tensor, a: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U sqrt(S), V sqrt(S)) of dW = scale * B A (shapes out x r, in x r), via QR of B and A^T and an
    r x r SVD (exact, cheap). Each component's sign is fixed so its largest-magnitude U entry is
    positive, so the result depends on dW only, not on how it was factored. Batched over leading axes."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.transpose(-1, -2))
    uc, s, vh = torch.linalg.svd(scale * rb @ ra.transpose(-1, -2))
    u, v = qb @ uc, qa @ vh.transpose(-1, -2)
    idx = u.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(u, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    root = s.clamp_min(0).sqrt().unsqueeze(-2)
    return u * sign * root, v * sign * root


def lora_inputs(loras: list[dict], cfg: AttackerConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per module, the two rank-channel inputs of its tensor encoder, stacked over ``loras``:
    (K x r x out, K x r x in_eff)."""
    out = []
    scale = cfg.alpha / cfg.rank
    for name in cfg.modules:
        bs, as_ = zip(*(factors(lo, name) for lo in loras))
        b, a = torch.stack(bs), torch.stack(as_)
        if cfg.inputs == "canonical":
            u, v = canonical_factors(b, a, scale)
            out.append((u.transpose(-1, -2), v.transpose(-1, -2)))
        else:
            out.append((b.transpose(-1, -2) * math.sqrt(scale), a * math.sqrt(scale)))
    return out


class TensorEncoder(nn.Module):
    """One LoRA tensor pair -> one token: rank axis as channels; a learned linear map along each long
    axis (out, in) to ``axis_width`` features per component; then a 2-layer MLP to the token width."""

    def __init__(self, out_dim: int, in_dim: int, rank: int, axis_width: int, width: int):
        super().__init__()
        self.along_out = nn.Linear(out_dim, axis_width)
        self.along_in = nn.Linear(in_dim, axis_width)
        self.mlp = nn.Sequential(nn.Linear(2 * rank * axis_width, width), nn.GELU(), nn.Linear(width, width))
        # the inputs are small (a LoRA update): scale them up to unit-ish size
        self.gain = nn.Parameter(torch.tensor(10.0))

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.along_out(u * self.gain), self.along_in(v * self.gain)], dim=-1)  # K x r x 2w
        return self.mlp(h.flatten(1))


def step_embedding(step: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of fine-tuning step indices (K,) -> K x dim."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(step.device)
    ang = step.float()[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class Attacker(nn.Module):
    """LoRA weights (+ fine-tuning step) -> distribution over prompt embeddings z (L x D)."""

    def __init__(self, cfg: AttackerConfig, class_embedding: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoders = nn.ModuleList(TensorEncoder(o, i, cfg.rank, cfg.axis_width, cfg.width) for o, i in cfg.shapes)
        self.module_pos = nn.Parameter(torch.randn(len(cfg.modules), cfg.width) * 0.02)
        self.queries = nn.Parameter(torch.randn(cfg.text_len, cfg.width) * 0.02)  # the task tokens
        self.step_mlp = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width))
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
        )
        self.transformer = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.mu = nn.Linear(cfg.width, cfg.text_dim)
        self.logvar = nn.Linear(cfg.width, cfg.text_dim)
        for head in (self.mu, self.logvar):  # start at z = class embedding, small variance
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        with torch.no_grad():
            self.logvar.bias.fill_(-6.0)
        ce = class_embedding if class_embedding is not None else torch.zeros(cfg.text_len, cfg.text_dim)
        self.register_buffer("class_embedding", ce.detach().float().reshape(cfg.text_len, cfg.text_dim).clone())

    def forward(self, inputs: list[tuple[torch.Tensor, torch.Tensor]], step: torch.Tensor):
        """(mu, logvar), each K x L x D; ``inputs`` from :func:`lora_inputs`, ``step`` (K,)."""
        tokens = torch.stack([enc(u, v) for enc, (u, v) in zip(self.encoders, inputs)], dim=1) + self.module_pos
        k = tokens.shape[0]
        st = self.step_mlp(step_embedding(step.clamp(0, self.cfg.max_step), self.cfg.width)).unsqueeze(1)
        seq = torch.cat([self.queries.expand(k, -1, -1), st, tokens], dim=1)
        h = self.norm(self.transformer(seq)[:, : self.cfg.text_len])
        return self.class_embedding + self.mu(h), self.logvar(h).clamp(-12, 4)

    @torch.no_grad()
    def encode(self, loras: list[dict], steps) -> torch.Tensor:
        """Mean z (K x L x D) for LoRAs at the given fine-tuning steps (the attack uses the mean)."""
        p = next(self.parameters())
        inputs = [(u.to(p.device), v.to(p.device)) for u, v in lora_inputs(loras, self.cfg)]
        mu, _ = self(inputs, torch.as_tensor(list(steps), device=p.device))
        return mu


def config_for(pipe, lora: dict, rank: int, alpha: float, **kw) -> AttackerConfig:
    """An attacker config matching the LoRA layout of ``lora`` on ``pipe``'s base."""
    from core.model.prior import base_fingerprint

    names = module_names(lora)
    shapes = [list(factors(lora, n)[0].shape[:1]) + list(factors(lora, n)[1].shape[1:]) for n in names]
    te = pipe.text_encoder.config
    return AttackerConfig(
        modules=names,
        shapes=shapes,
        rank=rank,
        alpha=alpha,
        text_len=pipe.tokenizer.model_max_length,
        text_dim=te.hidden_size,
        base=base_fingerprint(pipe),
        **kw,
    )


def save_attacker(model: Attacker, path: str | Path, info: dict | None = None) -> Path:
    """Weights as float16 safetensors (half the size; the attack runs in float32); the config (and
    training facts in ``info``) as JSON metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {
        k: v.detach().half().contiguous() if v.is_floating_point() else v.detach().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(sd, str(path), metadata={"config": json.dumps(asdict(model.cfg)), "info": json.dumps(info or {})})
    return path


def load_attacker(path: str | Path | None = None, device="cpu") -> tuple[Attacker, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path or ATTACKER_DIR / "attacker.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    cfg = AttackerConfig(**json.loads(meta["config"]))
    model = Attacker(cfg)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    return model.to(device).eval(), json.loads(meta.get("info", "{}"))


# the attack ----------------------------------------------------------------------------------

# How the attack samples (chosen on the tuning group, shadow people the attacker never saw:
# docs/results/attack_tuning.md): each step is extrapolated 2x away from the base model's prediction
# for the same z (w = 2 gave the smallest identity distance of w = 1, 1.5, 2, 3, 4), and 8
# DPM-Solver++ steps draw as well as 20 there (0.401 vs 0.403) in under 1 s for 4 images.
ATTACK_W = 2.0
ATTACK_SAMPLER_STEPS = 8


@torch.no_grad()
def reconstruct(
    pipe,
    attacker: Attacker,
    lora: dict,
    step: int,
    seeds=(0, 1, 2, 3),
    steps: int = ATTACK_SAMPLER_STEPS,
    model=None,
    w: float = ATTACK_W,
):
    """The attack on one LoRA: z = attacker(LoRA, step), then the LoRA's own model (base + LoRA;
    pass ``model`` if it is already built) samples with z as its prompt embedding. With ``w`` > 1 (the
    default, :data:`ATTACK_W`) each sampler step is extrapolated away from the base model's prediction
    for the same z (:func:`core.attack.baselines.extrapolate`: FineXtract's guidance applied to the attacker's
    prompt); ``w = 1`` is the paper's attack, the fine-tuned model alone.
    Returns (images, z). Only the weights are used: no trigger, no photos."""
    from core.attack.baselines import extrapolate
    from core.finetune.lora import pipeline_with_lora
    from core.model.pipeline import sample_images

    p = next(attacker.parameters())
    z = attacker.to(pipe.device).encode([lora], [step])
    attacker.to(p.device)
    view = model if model is not None else pipeline_with_lora(pipe, lora, attacker.cfg.alpha)
    emb = z.to(pipe.device, pipe.unet.dtype).expand(len(seeds), -1, -1)
    if w != 1:
        return extrapolate(pipe, view, emb, w, list(seeds), steps), z[0].cpu()
    return sample_images(view, n=len(seeds), seed=list(seeds), steps=steps, prompt_embeds=emb), z[0].cpu()
