"""Fine-tune tab: upload photos -> aligned crops -> live DreamBooth-LoRA fine-tune -> download.

Only wiring: ingestion, fine-tuning, scoring and plotting all live in ``core``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import gradio as gr

from core import ASSETS
from core.attack.report import attacker_mismatch, reconstruct_lora
from core.defenses.posthoc import DEFENSES, DPConfig, apply_defense, dp_finetune
from core.engine import Engine, SampleRequest
from core.events import Checkpoint, Done, Preview, Progress
from core.finetune.lora import (
    MAX_PHOTOS,
    MIN_PHOTOS,
    FinetuneConfig,
    finetune,
    pick_trigger,
    pipeline_with_lora,
    save_lora,
)
from core.faces.metrics import SAME_PERSON
from core.model.pipeline import sample_images
from core.plots import attack_curve, loss_curve
from core.model.prompts import CLASS_PROMPT, instance_prompt
from core.faces.utility import identity_distance, lora_utility
from ui.layers_tab import record_checkpoint
from ui.session import SESSION_TTL, close_session, ensure, media, parse_seed
from ui.gpu import on_gpu
from ui.uploads import photo_lines, read_photos

EXAMPLES = ASSETS / "examples"

INTRO = f"""
### 1. Your photos  →  2. a LoRA  →  3. what it gives away
Upload **{MIN_PHOTOS} to {MAX_PHOTOS} photos of one face** (or use the example face, drawn by the base model: nobody
real). Each photo is cropped and aligned the way the model was trained. Then press **Train**: the app
fine-tunes a LoRA on them (DreamBooth style, with a secret trigger word) and you watch it learn.
Your photos stay in your session only and are deleted when you leave.
"""


def example_sets() -> dict[str, list[str]]:
    """Bundled example subjects: folders of PNG faces the project generated with its base model."""
    if not EXAMPLES.is_dir():
        return {}
    return {d.name: sorted(str(p) for p in d.glob("*.png")) for d in sorted(EXAMPLES.iterdir()) if d.is_dir()}


def read_faces(files, size: int = 64, session=None) -> tuple[list, list[str], list[str]]:
    """Photo inputs -> (aligned face crops, a line per refused photo, a line per remark on a used one):
    :func:`ui.uploads.read_photos` (only the visitor's own uploads, each deleted once read)."""
    reads = read_photos(files, session, size)
    return [r.crop for r in reads if r.crop is not None], *photo_lines(reads)


def ingest_files(files, session, size: int = 64, request=None):
    """Uploaded files -> crops in the session; a line per refused photo, the rest still usable."""
    session = ensure(session, request)
    reads = read_photos(files, session, size)
    lines, notes = photo_lines(reads)
    session.crops[:] = [r.crop for r in reads if r.crop is not None]
    n = len(session.crops)
    head = f"**{n} usable photo{'s' if n != 1 else ''}.**"
    if n < MIN_PHOTOS:
        head += f" A fine-tune needs at least {MIN_PHOTOS}: add more photos of the same face."
    elif n > MAX_PHOTOS:
        head += f" Only the first {MAX_PHOTOS} will be used."
    if lines:
        head += " These photos were left out:\n" + "\n".join(lines)
    if notes:
        head += "\n\nPlease check:\n" + "\n".join(notes)
    shown = [(r.crop, f"photo {i}: {' '.join(r.notes)}") if r.notes else r.crop
             for i, r in enumerate(reads, 1) if r.crop is not None]
    return shown, head, session


# the live attack during a fine-tune -----------------------------------------------------------

LIVE_SEEDS = (0, 1)  # reconstructions per checkpoint
LIVE_HEAD = "#### What an attacker rebuilds from the LoRA weights alone"
LIVE_INTRO = (f"{LIVE_HEAD}\nAt every checkpoint of the fine-tune, an attacker who sees **only the LoRA's weights** "
              "(not your photos, not your trigger word) reads them and draws the face it thinks the LoRA was "
              "trained on.")


def live_score(step: int, attack: float, floor: float, ceiling: float | None, n_attack: int, n_floor: int,
               n_ceiling: int) -> str:
    """The identity line under the live reconstruction (numbers from ``core.faces.utility.identity_distance``)."""
    if ceiling is not None:
        ceil = f"**{ceiling:.2f}**"
    else:
        ceil = "measuring on this step's preview samples..." if n_ceiling else "not measured (no previews in this run)"
    verdict = (f"The reconstruction is **closer to you than a random face** (by {floor - attack:.2f})."
               if attack < floor else "The reconstruction is not closer to you than a random face (yet).")
    return (f"**Identity score at step {step}**: dlib distance of each set's mean face descriptor to your photos'; "
            f"lower = closer, below {SAME_PERSON} dlib counts it as the same person.\n"
            f"- the attacker's reconstruction ({n_attack} images, from the LoRA weights alone): **{attack:.2f}**\n"
            f"- floor, a random face from the base model ({n_floor} images of \"{CLASS_PROMPT}\"): **{floor:.2f}**\n"
            f"- ceiling, your LoRA used with the secret trigger, which the attacker does not have "
            f"({n_ceiling} preview images): {ceil}\n\n"
            f"{verdict} Compare with the floor rather than with {SAME_PERSON}: averaging descriptors pulls any set "
            "toward the average face, so even a random face is often below it.")


# defenses before sharing ------------------------------------------------------------------------

NO_DEFENSE = "none"
DEFENSE_CHOICES = [("none", NO_DEFENSE), ("weight noise", "weight_noise"), ("prune", "prune"), ("quantize", "quantize"),
                   ("rank truncation", "rank_truncate")]
# strength slider per post-hoc defense: (minimum, maximum, step, default, label, info)
DEFENSE_SLIDERS = {
    "weight_noise": (0.0, 5.0, 0.05, 1.0, "Noise strength", "Gaussian noise added to every weight; its std relative to "
                     "the typical size of the weights of that tensor (1 = noise as large as the weights)"),
    "prune": (0.0, 0.99, 0.01, 0.9, "Fraction of weights set to zero",
              "in every LoRA tensor, this share of its smallest weights becomes 0"),
    "quantize": (2, 16, 1, 4, "Bits per weight", "each tensor's weights rounded to 2^bits - 1 levels; fewer bits = coarser"),
    "rank_truncate": (1, 32, 1, 2, "Directions kept",
                      "each layer's change B·A cut to its strongest directions (at or above the LoRA rank, nothing is cut)"),
}
DP_DEFAULT_NOISE = 1.0
DEFENSES_INTRO = """
Two kinds of protection, both optional (see the **Defenses** tab for what each one costs, measured on many people):
- **Differential privacy (DP-SGD)**: train with each photo's influence clipped and hidden under random noise. The
  status line shows the privacy accountant's **epsilon** (smaller = stronger promise). Epsilon is **per photo**: it
  bounds how much the LoRA reveals about whether any *one* photo was used, not about *you*; a person with 5 photos in
  the set has roughly 5x that epsilon. More noise: smaller epsilon, and a LoRA that learns your face less well.
- **Edit the LoRA before sharing it**: noise, pruning, quantization or rank truncation of its weights. Applied to the
  file you download and to the LoRA the live attacker reads at every checkpoint, so you see both the
  reconstructions and your LoRA's own samples change.
"""


def defense_slider(name):
    """The strength slider for a post-hoc defense choice (hidden for none)."""
    if name not in DEFENSE_SLIDERS:
        return gr.Slider(visible=False)
    lo, hi, step, value, label, info = DEFENSE_SLIDERS[name]
    return gr.Slider(minimum=lo, maximum=hi, step=step, value=value, label=label, info=info, visible=True)


def defense_words(name: str, strength) -> str:
    """A post-hoc defense at a strength, in words."""
    if name == "weight_noise":
        return f"weight noise ({strength:g}x the weights' typical size)"
    if name == "prune":
        return f"pruning ({100 * strength:g} % of the weights set to zero)"
    if name == "quantize":
        return f"quantization to {int(strength)} bits"
    if name == "rank_truncate":
        return f"rank truncation (top {int(strength)} directions kept)"
    return name


def resolve_defense(defense, strength):
    """(defense name or None, strength of the right type), validated; gr.Error when unusable."""
    if defense in (None, "", NO_DEFENSE):
        return None, None
    if defense not in DEFENSES:
        raise gr.Error(f"Unknown defense {defense!r}; choose one of: {', '.join(c for _, c in DEFENSE_CHOICES)}.")
    try:
        s = float(DEFENSE_SLIDERS[defense][3] if strength in (None, "") else strength)
        if defense in ("quantize", "rank_truncate"):
            s = int(round(s))
        apply_defense({}, defense, s)  # the defense's own check of its strength
    except (TypeError, ValueError) as e:
        raise gr.Error(f"Bad strength for {defense}: {e}")
    return defense, s


def epsilon_words(epsilon: float, n_photos: int) -> str:
    """The accountant's epsilon in plain words (per photo; roughly n x for a person with n photos)."""
    if not math.isfinite(epsilon):
        return "epsilon = ∞: with no noise, DP-SGD's clipping alone promises nothing"
    return (f"epsilon **{epsilon:.3g}** per photo (it covers any *one* photo, not you: a person with 5 photos has "
            f"roughly 5x that; with your {n_photos} photos, about {n_photos * epsilon:.3g})")


def train_run(engine: Engine, session, steps, rank, lr, seed, text_encoder, dp=False, dp_noise=DP_DEFAULT_NOISE,
              defense=NO_DEFENSE, strength=None):
    """The Train button: fine-tune (with DP-SGD when ``dp``) with the live attack; a post-hoc
    ``defense`` at ``strength`` is applied to every checkpoint the attacker reads, to the previews and to
    the exported LoRA. Yields dicts {output name: value} (names of ``FINETUNE_OUTPUTS``; missing ones
    stay as they are)."""
    session = ensure(session)
    if len(session.crops) < MIN_PHOTOS:
        raise gr.Error(f"Add at least {MIN_PHOTOS} usable photos of one face first (you have {len(session.crops)}).")
    try:
        seed = parse_seed(seed)
        cfg = FinetuneConfig(steps=int(steps), rank=int(rank), alpha=float(rank), lr=float(lr), seed=seed,
                             text_encoder=bool(text_encoder))
        dpc = DPConfig(noise_multiplier=float(DP_DEFAULT_NOISE if dp_noise in (None, "") else dp_noise)) if dp else None
    except (TypeError, ValueError) as e:
        raise gr.Error(str(e))
    if dp and cfg.text_encoder:
        raise gr.Error("DP-SGD trains the UNet LoRA only: untick \"Also train a LoRA on the text encoder\" to use it.")
    defense, strength = resolve_defense(defense, strength)
    photos = session.crops[:MAX_PHOTOS]
    trigger = pick_trigger(cfg)
    attacker, why = engine.attacker()
    # with a post-hoc defense the previews are drawn here, from the defended LoRA (the core's would show the raw one)
    run_cfg = replace(cfg, preview_n=0) if defense else cfg
    events = dp_finetune(engine.pipe, photos, run_cfg, dpc) if dp else finetune(engine.pipe, photos, run_cfg)
    tag = f" ({defense_words(defense, strength)})" if defense else ""

    def shared(lora):
        return apply_defense(lora, defense, strength) if defense else lora

    plan = []
    if dp:
        plan.append(f"training with DP-SGD (noise multiplier {dpc.noise_multiplier:g})")
    if defense:
        plan.append(f"{defense_words(defense, strength)} applied to the LoRA file you download and to every "
                    "checkpoint the attacker reads")
    plan_text = (" Defenses: " + "; ".join(plan) + ".") if plan else ""
    steps_seen, losses, inst, gallery = [], [], [], []
    recon, a_steps, a_dist, c_dist, floor = [], [], [], [], None
    epsilon = None
    yield dict(status=f"Preparing... your secret trigger word is **{trigger}** (prompt: *{instance_prompt(trigger)}*).{plan_text}",
               loss=None, previews=[], score="", download=None, session=session,
               attack_head=LIVE_INTRO if attacker is not None else
               f"{LIVE_HEAD}\n**The live attack is not available:** {why} The fine-tune works without it.",
               attack_photos=gr.update(value=list(photos), visible=attacker is not None),
               attack_gallery=gr.Gallery(value=[], visible=attacker is not None), attack_score="",
               attack_plot=gr.Plot(value=None, visible=attacker is not None))

    def scores():
        return dict(attack_score=live_score(a_steps[-1], a_dist[-1], floor, c_dist[-1], len(LIVE_SEEDS),
                                            len(engine.floor_images()), cfg.preview_n),
                    attack_plot=attack_curve(a_steps, a_dist, c_dist, floor, cfg.steps), session=session)

    def on_preview(step, images):
        nonlocal gallery
        gallery = (gallery + [(im, f"step {step}{tag}") for im in images])[-12:]
        yield dict(previews=gallery, session=session)
        if a_steps and a_steps[-1] == step:  # the ceiling at the step just attacked
            c_dist[-1] = identity_distance(images, photos)
            yield scores()

    for ev in events:
        if isinstance(ev, Checkpoint):
            lora = shared(ev.lora)  # what would be shared at this step
            # per-layer change for the Layers tab's heatmap over the steps
            record_checkpoint(engine, session, ev.step, lora, cfg.alpha)
        if isinstance(ev, Progress):
            steps_seen.append(ev.step)
            losses.append(ev.metrics["loss"])
            inst.append(ev.metrics["instance_loss"])
            epsilon = ev.metrics.get("epsilon", epsilon)
            if ev.step % 5 == 0 or ev.step == ev.total:
                eps = f" DP-SGD: {epsilon_words(epsilon, len(photos))}." if epsilon is not None else ""
                yield dict(status=f"Training step **{ev.step}/{ev.total}** ({ev.elapsed:.0f} s). Trigger word: **{trigger}**.{eps}",
                           loss=loss_curve(steps_seen, losses, inst, ev.total), session=session)
        elif isinstance(ev, Checkpoint):
            if attacker is not None:
                mismatch = attacker_mismatch(attacker, lora)
                if mismatch:
                    attacker = None
                    yield dict(attack_head=f"{LIVE_HEAD}\n**The attacker cannot read this LoRA:** {mismatch} "
                                           "The fine-tune goes on without the live attack.", session=session)
                else:
                    ims = reconstruct_lora(engine.pipe, attacker, lora, ev.step, cfg.alpha, seeds=LIVE_SEEDS)
                    if floor is None:
                        floor = identity_distance(engine.floor_images(), photos)
                    recon = [(im, f"step {ev.step}") for im in ims] + recon  # newest first, earlier steps kept
                    a_steps.append(ev.step)
                    a_dist.append(identity_distance(ims, photos))
                    c_dist.append(None)
                    yield dict(attack_head=f"{LIVE_HEAD}{tag}, step {ev.step}", attack_gallery=recon, **scores())
            if defense and cfg.preview_n:  # the defended LoRA's own samples, drawn as the fine-tune draws its previews
                ims = sample_images(pipeline_with_lora(engine.pipe, lora, cfg.alpha), instance_prompt(trigger),
                                    n=cfg.preview_n, seed=0, steps=cfg.preview_steps)
                yield from on_preview(ev.step, ims)
        elif isinstance(ev, Preview):
            yield from on_preview(ev.step, ev.images)
        elif isinstance(ev, Done):
            res = replace(ev.result, lora=shared(ev.result.lora))  # the LoRA as shared: what every other tab sees
            session.result = res
            session.trained_on = list(photos)
            path = save_lora(session.dir / "lora.safetensors", res, base_name=engine.model_name)
            yield dict(status="Scoring the LoRA against your photos...", download=str(path), session=session)
            u = lora_utility(engine.pipe, res.lora, res.trigger, photos, alpha=cfg.alpha, floor=engine.floor_images())
            verdict = "the same person by dlib's rule (< 0.6)" if u.same_person else "not close enough to count as the same person (>= 0.6)"
            done = [f"Done: {res.steps_done} steps in {res.seconds:.0f} s. Trigger word: **{res.trigger}** "
                    f"(prompt: *{instance_prompt(res.trigger)}*). Keep it to yourself: it is not in the file."]
            if dp:
                done.append(f"Trained with DP-SGD (noise multiplier {res.noise_multiplier:.3g}): "
                            f"{epsilon_words(res.epsilon, len(photos))}.")
            if defense:
                done.append(f"The file holds your LoRA after {defense_words(defense, strength)}; the Attack and "
                            "Layers tabs look at this defended LoRA.")
            done.append("The **Attack** tab runs every weight-only attack on this LoRA.")
            score = (f"**How well your LoRA draws you** (dlib identity distance of its 4 samples to your photos; lower is closer):\n"
                     f"- your LoRA with the trigger word{' after ' + defense_words(defense, strength) if defense else ''}: "
                     f"**{u.distance:.2f}**, {verdict}\n")
            if defense:
                u0 = lora_utility(engine.pipe, ev.result.lora, res.trigger, photos, alpha=cfg.alpha, floor=engine.floor_images())
                score += f"- the same LoRA before the defense: **{u0.distance:.2f}**\n"
            score += f"- a random face from the base model (\"{CLASS_PROMPT}\"), for comparison: **{u.floor:.2f}**"
            yield dict(status=" ".join(done), score=score, download=str(path), session=session)


# outputs of the Train button, in the order of its event (the API returns all but the session)
FINETUNE_OUTPUTS = ("status", "loss", "previews", "score", "download", "session",
                    "attack_head", "attack_photos", "attack_gallery", "attack_score", "attack_plot")


def create_finetune_tab(engine: Engine) -> gr.State:
    """The tab; returns the visitor's session state (other tabs read the fine-tuned LoRA from it)."""
    session = gr.State(None, time_to_live=SESSION_TTL, delete_callback=close_session)
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            files = gr.File(label=f"Your photos ({MIN_PHOTOS}-{MAX_PHOTOS} of one face)", file_count="multiple",
                            type="filepath")  # any file: one that is not a photo gets a sentence saying what to upload
            examples = example_sets()
            if examples:
                example_btn = gr.Button(f"Use the example face ({len(next(iter(examples.values())))} photos made by the base model)")
            crops = gr.Gallery(label="Aligned crops the LoRA trains on (64 px)", columns=5, height=160, object_fit="contain")
            report = gr.Markdown()
            with gr.Row():
                steps = gr.Slider(20, 600, value=FinetuneConfig.steps, step=10, label="Training steps",
                                  info="more steps: the LoRA learns your face better, and leaks more")
            with gr.Accordion("Advanced settings", open=False):
                rank = gr.Slider(1, 32, value=FinetuneConfig.rank, step=1, label="LoRA rank r")
                lr = gr.Number(value=FinetuneConfig.lr, label="Learning rate")
                seed = gr.Number(value=None, precision=0, label="Seed (empty = a fresh random one; it also picks the trigger word)")
                text_encoder = gr.Checkbox(value=False, label="Also train a LoRA on the text encoder")
            with gr.Accordion("Defenses (what you can do before sharing)", open=False):
                gr.Markdown(DEFENSES_INTRO)
                dp = gr.Checkbox(value=False, label="Train with differential privacy (DP-SGD)",
                                 info="UNet LoRA only; each step costs more than a plain one")
                dp_noise = gr.Slider(0.0, 10.0, value=DP_DEFAULT_NOISE, step=0.1, label="DP noise multiplier σ",
                                     info="more noise: smaller epsilon (a stronger promise), and a LoRA that learns you less")
                defense = gr.Dropdown(DEFENSE_CHOICES, value=NO_DEFENSE, label="Edit the LoRA before sharing it")
                lo, hi, st, val, lab, inf = DEFENSE_SLIDERS["prune"]
                strength = gr.Slider(lo, hi, value=val, step=st, label=lab, info=inf, visible=False)
                defense.change(defense_slider, defense, strength, queue=False, api_visibility="private")
            with gr.Row():
                train = gr.Button("Train", variant="primary")
                stop = gr.Button("Stop")
        with gr.Column(scale=2):
            status = gr.Markdown("Upload photos, then press **Train**.")
            loss_plot = gr.Plot(label="Loss")
            previews = gr.Gallery(label="The LoRA's own samples with your trigger word, as it learns", columns=6,
                                  height=180, object_fit="contain")
            score = gr.Markdown()
            download = gr.File(label="Your LoRA file (diffusers format; the trigger word is not in it)")
            attack_head = gr.Markdown(LIVE_INTRO)
            with gr.Row():
                attack_photos = gr.Gallery(label="Your photos (the attacker never sees them)", columns=3, height=180,
                                           object_fit="contain", scale=1)
                attack_gallery = gr.Gallery(label="The attacker's reconstructions, newest first", columns=6,
                                            height=180, object_fit="contain", scale=2)
            attack_score = gr.Markdown()
            attack_plot = gr.Plot(label="Identity distance over the fine-tune")

    def ingest(f, s, request: gr.Request):  # the crops are shown from files in the visitor's session dir
        shown, head, s = ingest_files(f, s, engine.image_size, request)
        return media(s, shown), head, s

    files.upload(ingest, [files, session], [crops, report, session], api_name="ingest")
    if examples:
        first = next(iter(examples.values()))

        def use_example(s, request: gr.Request):
            return ingest(first, s, request)

        example_btn.click(use_example, [session], [crops, report, session])

    outputs = dict(status=status, loss=loss_plot, previews=previews, score=score, download=download, session=session,
                   attack_head=attack_head, attack_photos=attack_photos, attack_gallery=attack_gallery,
                   attack_score=attack_score, attack_plot=attack_plot)

    def run(session, steps, rank, lr, seed, text_encoder, dp, dp_noise, defense, strength, request: gr.Request):
        session = ensure(session, request)  # registered under the browser session: its end deletes the files
        for update in train_run(engine, session, steps, rank, lr, seed, text_encoder, dp, dp_noise, defense, strength):
            session = update.get("session", session)  # every image shown is a file in the visitor's session dir
            yield tuple(media(session, update.get(k, gr.skip())) for k in FINETUNE_OUTPUTS)

    ev = train.click(on_gpu(run, 300), [session, steps, rank, lr, seed, text_encoder, dp, dp_noise, defense, strength],
                     [outputs[k] for k in FINETUNE_OUTPUTS],
                     concurrency_limit=1, concurrency_id="finetune", api_name="train")
    stop.click(lambda: "Stopped.", None, status, cancels=[ev])

    with gr.Accordion("The base model, before any fine-tune", open=False):
        gr.Markdown(
            f"Every fine-tune starts from this model (`{engine.model_name}`, {engine.image_size} px, on "
            f"`{engine.device}`). These faces are drawn from the prompt **\"{CLASS_PROMPT}\"**: they are "
            f"no one in particular.")
        with gr.Row():
            s_seed = gr.Number(value=0, precision=0, label="Seed", info="same seed, same faces")
            s_n = gr.Slider(1, 16, value=8, step=1, label="How many faces")
            s_steps = gr.Slider(5, 50, value=25, step=1, label="Denoising steps")
            s_guid = gr.Slider(1.0, 8.0, value=1.0, step=0.5, label="Guidance scale")
        draw = gr.Button("Draw faces")
        base_gallery = gr.Gallery(label="Samples of the base model", columns=8, height="auto", object_fit="contain")

        def sample(seed, n, steps, guidance):
            try:
                req = SampleRequest(CLASS_PROMPT, int(n), int(seed), int(steps), float(guidance))
            except ValueError as e:
                raise gr.Error(str(e))
            return engine.sample(req)

        draw.click(on_gpu(sample, 60), [s_seed, s_n, s_steps, s_guid], base_gallery, api_name="sample", concurrency_limit=2)
    return session
