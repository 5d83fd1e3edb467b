"""The diffusion model: the embedded miniature Stable Diffusion, or any SD 1.x by model id.

The embedded default is a real ``diffusers.StableDiffusionPipeline`` (the pretrained tiny
autoencoder of :mod:`core.model.autoencoder` + UNet2DConditionModel + CLIPTextModel + a word-level
tokenizer, see :mod:`core.model.prompts`), at 128 px with 16x16x32 latents, predicting v, trained by
``python -m core.model.train_base`` and saved in ``assets/base``. Loading it needs
:mod:`core.model.autoencoder` imported (diffusers resolves the component's class from
``model_index.json`` among imported modules); :func:`load_pipeline` does that.
:func:`load_pipeline` loads it, a folder saved the same way, or a hub model id (only when the user
names one: the default path never touches the network).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

import numpy as np
import torch

from core import ASSETS
from core.events import never
from core.model.prompts import CLASS_PROMPT, MAX_LENGTH, build_tokenizer

DEFAULT_BASE = ASSETS / "base"
EMBEDDED_NAME = "embedded"  # what the UI and CLIs call the shipped miniature model


def cores() -> int:
    """Cores for intra-op work: every core, or ``$LEAKLAB_THREADS`` (e.g. 1 when two jobs share a
    2-core machine: two processes spinning on the same cores run many times slower than either alone)."""
    return int(os.environ.get("LEAKLAB_THREADS") or os.cpu_count() or 1)


def configure_threads(n: int | None = None) -> None:
    """Intra-op threads of the calling thread and the default of threads that start computing
    later: ``n`` (default :func:`cores`). PyTorch keeps one setting for the process, applied to each
    thread when it first computes; see :func:`thread_with_cores` for one thread with more."""
    n = n or cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def thread_with_cores(target, n: int, name: str) -> threading.Thread:
    """Start ``target`` in a daemon thread whose intra-op work uses ``n`` cores, leaving the default
    of every other thread as it was.

    Why a server needs this: PyTorch's OpenMP runtime (libgomp) keeps a team of worker threads for
    a thread that has computed on several cores, and a worker thread's parallel regions then cost
    far more (~60 us each, its team sleeping between them instead of spinning): a 64 px fine-tune
    step takes 0.21 s in a worker thread alone and 0.40 s once the main thread has computed on
    every core (``python -m bench.live_work``). Gradio runs handlers in a pool of threads, so the
    app computes on one core in every thread (the main one included, from loading on:
    :class:`core.engine.Engine`) but the training hub's, which gets the cores."""
    default = torch.get_num_threads()
    ready = threading.Event()

    def run():
        # first the thread's lazy start-up (it copies the process's setting into the thread, and would
        # otherwise do so at its first parallel region: after the caller has put the default back)
        torch.get_num_threads()
        torch.set_num_threads(n)
        ready.set()
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    ready.wait()
    torch.set_num_threads(default)  # the setting is the process's: give the other threads theirs back
    return thread


def events_on_cores(job, n: int, should_stop=never):
    """Generator: the events of ``job(stop)`` (a generator function taking a stop test), computed in a
    thread of its own on ``n`` cores (:func:`thread_with_cores`) and passed on as they come, e.g. a
    visitor's cloak on every core while the training hub idles. Its exceptions are raised here;
    closing this generator (the visitor left) stops the job at its next check of ``stop``. With
    ``n`` no more than the calling thread's cores the job simply runs here."""
    if n <= torch.get_num_threads():
        yield from job(should_stop)
        return
    events: queue.Queue = queue.Queue()
    left = threading.Event()

    def run():
        try:
            for ev in job(lambda: left.is_set() or should_stop()):
                events.put(("event", ev))
            events.put(("end", None))
        except Exception as e:
            events.put(("error", e))

    thread_with_cores(run, n, "events-on-cores")
    try:
        while True:
            kind, value = events.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        left.set()


def cpu_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N x C x H x W) channels-last on a CPU, unchanged elsewhere: oneDNN's convolutions then
    skip a reorder per layer (the weights need not move: the input's layout decides). Measured for
    the cloak's PGD step at 128 px, 5 photos, 2 threads: 0.48 against 0.58 s."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" and x.dim() == 4 else x


def plain_attention(unet) -> None:
    """Use the plain (bmm) attention processor on a training copy of a UNet: ``vmap`` has no
    batching rule for CPU SDPA (it falls back to a per-sample loop), and at 64 px plain attention's
    forward+backward is ~16 % faster than SDPA's on this CPU (143 vs 170 ms at batch 4)."""
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mixed_precision(device: torch.device, enabled: bool = True):
    """Autocast for training: bf16 on CPU (AVX512-BF16 where present) and on CUDA GPUs that have it
    (no loss scaling needed), fp16 on older GPUs."""
    device = torch.device(device)
    half = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device.type, dtype=half, enabled=enabled)


# 1. Components of the miniature model --------------------------------------------------------


def build_autoencoder(kind: str, vae_channels, image_size: int, latent_channels: int | None):
    """(autoencoder, downsampling factor, latent channels) of :func:`build_components`."""
    from diffusers import AutoencoderKL

    from core.model.autoencoder import TinyAutoencoder

    if kind == "tiny":
        latent_channels = latent_channels or 32
        width = 64 if tuple(vae_channels) == (32, 64, 128) else vae_channels[0]
        ae = TinyAutoencoder(
            width=width, latent_channels=latent_channels, sample_size=image_size, block_out_channels=(width,) * 4
        )
        return ae, 8, latent_channels
    if kind == "kl":
        latent_channels = latent_channels or 4
        ae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            block_out_channels=tuple(vae_channels),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=16,
            sample_size=image_size,
        )
        return ae, 2 ** (len(vae_channels) - 1), latent_channels
    raise ValueError(f"vae must be 'tiny' or 'kl', got {kind!r}")


def build_components(
    unet_channels=(64, 128, 192),
    vae_channels=(32, 64, 128),
    text_width=128,
    text_layers=2,
    image_size=128,
    seed=0,
    vae: str = "tiny",
    latent_channels: int | None = None,
    prediction_type: str = "v_prediction",
):
    """Fresh components of the miniature SD (same shapes as the shipped one by default).

    ``vae="tiny"``: a :class:`~core.model.autoencoder.TinyAutoencoder` (8x, 32 latent channels;
    random weights, which :func:`core.model.autoencoder.load_taef2` replaces with TAEF2's; a
    narrower one with ``vae_channels[0]`` as its width for tests). ``vae="kl"``: an
    ``AutoencoderKL`` with ``vae_channels`` (the SD 1.x layout, 4 latent channels).
    """
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    autoencoder, down, latent_channels = build_autoencoder(vae, vae_channels, image_size, latent_channels)
    n = len(unet_channels)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=image_size // down,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(unet_channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=text_width,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    # Where sampling starts. An epsilon model's x0 estimate at t=999 (cosine schedule: alpha_bar ~ 0)
    # is noise / ~0, and DPM-Solver++ diverged there (0 % faces with "linspace", 97 % with "leading",
    # whose first of 25 steps is t=951: the 64 px base). A v-prediction model's x0 estimate stays
    # bounded at every t, so it starts from pure noise at t=999 ("trailing", Lin et al. 2023); started
    # at t=951 it reads pure noise as a noisy image that still holds some signal. First 128 px base,
    # 128 samples, same seeds: faces detected 0.86 with "leading", 0.96 with "trailing".
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        timestep_spacing="trailing" if prediction_type == "v_prediction" else "leading",
        steps_offset=1,  # "trailing" ignores it; StableDiffusionPipeline resets any other value to 1
    )
    return dict(vae=autoencoder, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def assemble_pipeline(components: dict):
    """A StableDiffusionPipeline from components (no safety checker: 64 px faces)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False
    )


# 2. Loading ----------------------------------------------------------------------------------


def load_pipeline(
    model: str | Path | None = None, device: str | None = None, dtype: torch.dtype | None = None, threads: int = 0
):
    """Load a StableDiffusionPipeline: the embedded base (default), a saved folder, or a hub id.

    The same ``from_pretrained`` call serves all three. A hub id is only reached when the caller
    names one (and the network allows it: ``HF_HUB_OFFLINE=1`` makes it use the local cache only).
    On CUDA the default dtype is float16, on CPU float32. On a CPU the calling thread computes on
    ``threads`` cores (0: :func:`cores`), set before loading (:func:`configure_threads`).
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    import core.model.autoencoder  # noqa: F401  (the embedded base's autoencoder class)

    dev = pick_device(device)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    src = str(model) if model not in (None, "", EMBEDDED_NAME) else str(DEFAULT_BASE)
    if dev.type == "cpu":
        configure_threads(threads)
    if src == str(DEFAULT_BASE) and not (DEFAULT_BASE / "model_index.json").exists():
        raise FileNotFoundError(f"embedded base model missing at {DEFAULT_BASE}: run python -m core.model.train_base")
    pipe = StableDiffusionPipeline.from_pretrained(
        src, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    if not isinstance(pipe.scheduler, DPMSolverMultistepScheduler):
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def save_pipeline(pipe, out: str | Path, half: bool = True, max_shard_size: str = "12MB") -> None:
    """Save with ``save_pretrained`` (safetensors); UNet and autoencoder weights stored in float16
    and in shards of at most ``max_shard_size`` to keep asset files small. The text encoder stays
    float32 (it is small): transformers loads a model in the dtype it was saved in, diffusers in
    float32, and a stock ``from_pretrained`` with no dtype must give one dtype throughout."""
    out = Path(out)
    halved = (pipe.unet, pipe.vae) if half else ()
    for m in halved:
        m.to(torch.float16)
    pipe.text_encoder.to(torch.float32)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    for m in halved:
        m.to(torch.float32)


# 3. Sampling ---------------------------------------------------------------------------------


def private_view(pipe):
    """The same modules with a scheduler of their own: schedulers keep per-run state, so
    concurrent sampling calls (app visitors) must not share one. Copies no weights."""
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    view = type(pipe)(**{**pipe.components, "scheduler": sched}, requires_safety_checker=False)
    view.set_progress_bar_config(disable=True)
    return view


def image_size_of(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def initial_latents(pipe, seeds, size: int | None = None) -> torch.Tensor:
    """Starting noise, one CPU generator per seed (image i depends on its own seed only)."""
    size = size or image_size_of(pipe)
    shape = (1, pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(int(s))) for s in seeds]
    return torch.cat(noise).to(pipe.device, pipe.unet.dtype)


@torch.no_grad()
def sample_images(
    pipe,
    prompt: str = CLASS_PROMPT,
    n: int = 4,
    seed: int | list[int] = 0,
    steps: int = 25,
    guidance: float = 1.0,
    prompt_embeds: torch.Tensor | None = None,
    size: int | None = None,
) -> list[np.ndarray]:
    """Sample ``n`` images (uint8 HxWx3). ``seed`` int: one generator per image, seeds seed..seed+n-1
    (so image i is the same whatever n); a list gives the seeds explicitly."""
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(n)]
    size = size or image_size_of(pipe)
    latents = initial_latents(pipe, seeds, size)
    kw = dict(prompt_embeds=prompt_embeds) if prompt_embeds is not None else dict(prompt=[prompt] * len(seeds))
    out = private_view(pipe)(
        **kw,
        latents=latents,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="np",
    ).images
    return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]


def time_sampling(pipe, n: int = 4, steps: int = 25, guidance: float = 1.0, repeats: int = 3) -> float:
    """Median wall seconds to sample ``n`` images (after one warm-up)."""
    sample_images(pipe, n=n, steps=steps, guidance=guidance)
    ts = []
    for r in range(repeats):
        t0 = time.perf_counter()
        sample_images(pipe, n=n, steps=steps, guidance=guidance, seed=100 + r)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))
