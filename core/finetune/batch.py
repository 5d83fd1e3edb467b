"""Many LoRAs trained in one stacked forward per step, each exactly as :func:`core.finetune.lora.finetune`
would train it alone; runs join and leave between steps (continuous batching).

Why: one UNet forward on K x (photos + class images) costs far less than K forwards of (photos +
class images) (the shadow population measured 2.03x per LoRA on this CPU, 11.1x on an H100), and
a workshop is K visitors pressing Train within a minute. Each run keeps everything that is its own:
its photos' latents, trigger word, random generator (the same draws, in the same order, as the
single fine-tune), LoRA weights as leaf tensors, AdamW state and step count, so a run that joins late
or leaves early (done, cancelled, disconnected) changes nothing for the others; their LoRAs equal
a run without it up to float rounding (tests/test_batch.py). Each step the active runs' weights are
stacked and run through one frozen adapter UNet with ``vmap(functional_call)``
(:func:`adapter_unet`).

What a batch shares: the recipe's hyper-parameters that shape the computation (rank, alpha, target
layers, batch size, class images, learning rate, clipping); :meth:`LoRABatch.accepts` says whether
a run's recipe fits. Text-encoder LoRAs and DP-SGD are not batched (they train alone).
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field, replace

import torch

from core.finetune.lora import (
    FinetuneConfig,
    adamw,
    check_photos,
    encode_photos,
    encode_prompt,
    lora_config,
    pick_trigger,
)
from core.model.denoising import Denoiser
from core.model.pipeline import mixed_precision, plain_attention
from core.model.prior import class_latents
from core.model.prompts import CLASS_PROMPT, instance_prompt

PLAIN_ATTENTION_MAX_LATENT = 32  # latent side up to which the plain (bmm) attention is used on a GPU


def adapter_unet(pipe, cfg: FinetuneConfig):
    """A frozen copy of the base UNet carrying an (untrained) peft adapter: the module every
    stacked LoRA is run through with ``functional_call``. Attention: the plain (bmm) processor on the
    CPU (``vmap`` has no batching rule for CPU SDPA) and on a GPU for latents up to 32x32 (the
    embedded model's path, measured in ``docs/results/bench_shadow_gpu.txt``); PyTorch's SDPA for
    larger latents (SD 1.x's 64x64: plain attention would keep a 4096 x 4096 score matrix per head and
    sample for the backward pass, ~4 GB per attention layer at 16 samples in half precision)."""
    unet = copy.deepcopy(pipe.unet).requires_grad_(False)
    unet.add_adapter(lora_config(cfg))
    if pipe.device.type == "cpu" or unet.config.sample_size <= PLAIN_ATTENTION_MAX_LATENT:
        plain_attention(unet)
    return unet.eval()


def stacked_forward(unet):
    """``forward(params, x, t, emb)``: ``unet``'s noise prediction with ``params`` swapped in, vmapped
    over a leading LoRA axis of every argument (K stacked LoRAs, each with its own inputs)."""
    from torch.func import functional_call, vmap

    return vmap(lambda p, x, t, e: functional_call(unet, p, (x, t, e)).sample)


class AdapterStack:
    """The frozen adapter UNet (:func:`adapter_unet`) that the batches of one recipe run their stacked
    LoRAs through, and its stacked forward: eager, or compiled once per process and then reused by
    every batch (the LoRAs are arguments of the forward, not weights of the module, so a new visitor
    never recompiles it).

    Why compile on a CPU: ``torch.compile`` fuses the UNet's elementwise work around oneDNN's
    convolutions and matmuls; a compiled step is faster, but compiling takes minutes on a 2-core CPU,
    so it is done once, in the background, while batches train eagerly (``python -m
    bench.compile_once`` measures both and the break-even). Only one LoRA at a time is compiled (a
    visitor training alone: the case the stacked forward does not already amortise): ``vmap``'s
    LoRA axis is specialised by the compiler (measured: marking it dynamic still compiled a graph per
    batch size), so every batch size would cost minutes of its own; several LoRAs run eagerly."""

    def __init__(self, pipe, cfg: FinetuneConfig):
        self.pipe, self.cfg = pipe, cfg
        self.unet = adapter_unet(pipe, cfg)
        self.eager = stacked_forward(self.unet)
        self.compiled = None  # the compiled stacked forward, once compile() has warmed it up
        self.compile_seconds = None
        self.compile_mode = None  # inductor's mode of the compiled forward ("reduce-overhead": CUDA graphs)
        self.compile_error = ""  # why compiling failed (the eager forward serves on)
        self._lock = threading.Lock()

    def forward(self, params, x, t, emb):
        if self.compiled is not None and x.shape[0] == 1:
            try:
                return self.compiled(params, x, t, emb)
            except Exception as e:  # e.g. CUDA graphs recorded in the compiling thread: serve on eagerly
                self.compiled, self.compile_error = None, f"{type(e).__name__}: {e}"[:300]
        return self.eager(params, x, t, emb)

    def compile(self, photos, backend: str = "inductor", mode: str | None = None) -> bool:
        """Compile the stacked forward (and its backward) on its own copy of the adapter UNet (the eager
        one may be training in another thread meanwhile: ``functional_call`` swaps a module's
        parameters while it runs), warmed up on ``photos`` (one LoRA, two steps: the forward's graph,
        then the backward's); returns whether the compiled forward is now in use. ``backend``:
        ``torch.compile``'s (the tests use "aot_eager": the same capture and autograd graphs without
        the code generation, which takes minutes); ``mode``: inductor's (default: "reduce-overhead"
        on CUDA, i.e. the step replayed as CUDA graphs, not thousands of kernel launches; none on a CPU)."""
        with self._lock:
            if self.compiled is not None:
                return True
            t0 = time.perf_counter()
            try:
                if mode is None and backend == "inductor" and self.pipe.device.type == "cuda":
                    mode = "reduce-overhead"
                fn = torch.compile(stacked_forward(adapter_unet(self.pipe, self.cfg)), backend=backend, mode=mode)
                warm = LoRABatch(self.pipe, self.cfg, forward=fn)
                warm_steps = 3 if mode == "reduce-overhead" else 2  # CUDA graphs are recorded on the 3rd call
                warm.add(0, photos, replace(self.cfg, steps=warm_steps))
                while warm.step():
                    pass
            except Exception as e:  # no C++ compiler, an unsupported op: keep the eager forward
                self.compile_error = f"{type(e).__name__}: {e}"[:300]
                return False
            self.compile_seconds, self.compile_mode = time.perf_counter() - t0, mode
            self.compiled = fn
            return True


def peft_key(param_name: str) -> str:
    """``...to_q.lora_A.default.weight`` -> ``unet.<...>.to_q.lora_A.weight`` (the in-memory naming)."""
    return "unet." + param_name.replace(".default", "")


def to_param_names(lora: dict) -> dict[str, torch.Tensor]:
    """In-memory naming (``unet.<m>.lora_A.weight``) -> the adapter UNet's parameter names."""
    return {
        k[len("unet.") :]
        .replace(".lora_A.weight", ".lora_A.default.weight")
        .replace(".lora_B.weight", ".lora_B.default.weight"): v
        for k, v in lora.items()
        if k.startswith("unet.")
    }


def initial_adapters(pipe, cfg: FinetuneConfig, seeds) -> dict[str, torch.Tensor]:
    """Stacked initial LoRA weights (K x ...), LoRA k initialised exactly as ``finetune`` does with
    seed ``seeds[k]`` (seed the global RNG, then let peft inject and initialise the adapter)."""
    from peft import inject_adapter_in_model

    config = lora_config(cfg)
    per = []
    for s in seeds:
        skeleton = target_layers(pipe.unet, config)
        torch.manual_seed(int(s))
        inject_adapter_in_model(config, skeleton)
        per.append({n: p.detach().float().clone() for n, p in skeleton.named_parameters() if "lora_" in n})
    return {n: torch.stack([p[n] for p in per]) for n in per[0]}


def target_layers(unet, config) -> torch.nn.Module:
    """A module tree holding only the layers of ``unet`` that the peft ``config`` targets (peft's own
    matching), under their own names and in their own order, with uninitialised weights of the same
    shapes. peft injects an adapter into it drawing from the RNG exactly as into the whole UNet,
    without a copy of the UNet's weights (that copy took ~1 s of a visitor's start)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    root = torch.nn.Module()
    for name, module in unet.named_modules():
        if not name or not check_target_module_exists(config, name):
            continue
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, torch.nn.Module())
            parent = parent._modules[part]
        empty = {id(p): torch.nn.Parameter(torch.empty_like(p), requires_grad=False) for p in module.parameters()}
        parent.add_module(leaf, copy.deepcopy(module, memo=empty))  # its weights uninitialised: not read
    return root


def unstack(params: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """LoRA ``k`` of a stack, in the in-memory naming of :func:`core.finetune.lora.lora_state_dict`."""
    return {peft_key(n): v[k].detach().float().cpu().clone() for n, v in params.items()}


# what must be equal for two recipes to train in one batch
SHARED_FIELDS = (
    "rank",
    "alpha",
    "unet_targets",
    "batch",
    "n_class",
    "prior_weight",
    "lr",
    "grad_clip",
    "mixed_precision",
)


@dataclass(eq=False)  # a run is itself: hashable by identity
class Run:
    """One LoRA in a batch."""

    key: object  # the caller's handle (a visitor's ticket, a shadow job)
    cfg: FinetuneConfig  # its recipe (seed, trigger and steps its own)
    trigger: str
    inst: torch.Tensor  # latents of its photos and their mirror images
    emb: torch.Tensor  # (2 batch) x L x D: instance prompt, then class prompt
    g: torch.Generator
    params: dict  # adapter parameter name -> leaf tensor (its LoRA)
    opt: torch.optim.Optimizer
    step: int = 0
    losses: list = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.steps

    def lora(self) -> dict:
        """Its LoRA now, in the in-memory naming of :func:`core.finetune.lora.lora_state_dict`."""
        return {peft_key(n): v.detach().float().cpu().clone() for n, v in self.params.items()}


class LoRABatch:
    """The runs being trained together on one base pipeline (see the module docstring)."""

    def __init__(self, pipe, cfg: FinetuneConfig, forward=None):
        """``forward``: the stacked forward to train with, e.g. a shared :class:`AdapterStack`'s
        (default: a new stack's, eager)."""
        if cfg.text_encoder:
            raise ValueError("a batch trains UNet LoRAs only (text_encoder=False)")
        self.pipe, self.cfg = pipe, cfg
        self.dev = pipe.device
        self.runs: list[Run] = []
        self.forward = forward or AdapterStack(pipe, cfg).forward
        self.den = Denoiser(pipe.scheduler.config)
        self.cls = class_latents(pipe, cfg.n_class).to(self.dev) if cfg.prior_weight > 0 and cfg.n_class > 0 else None
        with torch.no_grad():
            self.emb_cls = encode_prompt(pipe, CLASS_PROMPT)
        self.amp = cfg.mixed_precision if cfg.mixed_precision is not None else self.dev.type == "cuda"

    def accepts(self, cfg: FinetuneConfig) -> bool:
        """Can a run with recipe ``cfg`` train in this batch?"""
        return not cfg.text_encoder and all(getattr(cfg, f) == getattr(self.cfg, f) for f in SHARED_FIELDS)

    def add(self, key, crops, cfg: FinetuneConfig | None = None, latents: torch.Tensor | None = None) -> Run:
        """A new run on ``crops`` (its own seed, trigger and steps in ``cfg``), initialised exactly as
        ``finetune`` initialises a LoRA with that seed; it trains from the next :meth:`step` on.
        ``latents``: the crops' latents as :func:`core.finetune.lora.encode_photos` gives them, when
        the caller has encoded them already (the training hub encodes a visitor's photos in a
        thread of its own: in the trainer's, each newcomer stalled every run of the batch ~1 s)."""
        cfg = cfg or self.cfg
        if not self.accepts(cfg):
            raise ValueError(
                "this recipe cannot join the batch (rank, layers, batch size, class images, learning rate "
                "and clipping must be the batch's)"
            )
        trigger = cfg.trigger or pick_trigger(cfg)
        inst = latents.to(self.dev) if latents is not None else encode_photos(self.pipe, check_photos(crops))
        b = cfg.batch
        with torch.no_grad():
            e = [encode_prompt(self.pipe, instance_prompt(trigger)).expand(b, -1, -1)]
            if self.cls is not None:
                e.append(self.emb_cls.expand(b, -1, -1))
        params = {
            n: v[0].to(self.dev).requires_grad_(True) for n, v in initial_adapters(self.pipe, cfg, [cfg.seed]).items()
        }
        opt = adamw(list(params.values()), cfg.lr)
        run = Run(
            key,
            replace(cfg, trigger=trigger),
            trigger,
            inst,
            torch.cat(e),
            torch.Generator().manual_seed(cfg.seed),
            params,
            opt,
        )
        self.runs.append(run)
        return run

    def remove(self, run: Run) -> None:
        """Take a run out (done, cancelled or disconnected); the others go on unchanged."""
        self.runs = [r for r in self.runs if r is not run]

    def draw(self, run: Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's clean latents, timesteps and noise of one run: the same draws, in the same order,
        as ``finetune``."""
        b = run.cfg.batch
        x0 = run.inst[torch.randint(0, len(run.inst), (b,), generator=run.g)]
        if self.cls is not None:
            x0 = torch.cat([x0, self.cls[torch.randint(0, len(self.cls), (b,), generator=run.g)]])
        return (x0, *self.den.draw(x0.shape, run.g))

    def step(self) -> list[Run]:
        """One optimisation step of every active run (one stacked forward and backward); returns them."""
        runs = [r for r in self.runs if not r.done]
        if not runs:
            return []
        x0, t, noise = (torch.cat(parts) for parts in zip(*(self.draw(r) for r in runs)))
        noised = self.den.noise(x0, t=t, noise=noise)  # one call for all (run by run: 10 s of a room's trainer)
        k = len(runs)
        names = list(runs[0].params)
        stacked = {n: torch.stack([r.params[n] for r in runs]) for n in names}
        with mixed_precision(self.dev, self.amp):
            pred = self.forward(
                stacked,
                noised.noisy.view(k, -1, *noised.noisy.shape[1:]),
                noised.t.view(k, -1),
                torch.stack([r.emb for r in runs]),
            )
        b = self.cfg.batch
        err = self.den.errors(pred.reshape(noised.noisy.shape), noised).view(k, -1)  # K x 2b
        inst_loss = err[:, :b].mean(1)
        loss = inst_loss + (self.cfg.prior_weight * err[:, b:].mean(1) if self.cls is not None else 0.0)
        for r in runs:
            r.opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        for r in runs:
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(r.params.values()), self.cfg.grad_clip)
            r.opt.step()
            r.step += 1
        # the losses of all runs in one transfer: on a GPU one synchronisation per step, not two per run
        for r, pair in zip(runs, torch.stack([loss, inst_loss], 1).detach().float().cpu().tolist()):
            r.losses.append(tuple(pair))
        return runs
