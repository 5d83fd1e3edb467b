"""Fine-tune tab: upload photos -> aligned crops -> live DreamBooth-LoRA fine-tune -> download.

Only wiring: ingestion, fine-tuning, scoring and plotting all live in ``core``.
"""

from __future__ import annotations

import math

import gradio as gr

from core import ASSETS
from core.engine import Engine, SampleRequest
from core.events import Done, LayerChanges, Message, Preview, Progress, Reconstruction
from core.faces.metrics import SAME_PERSON
from core.finetune.hub import Failed, Queued, Training
from core.finetune.live import AttackUnavailable, LiveConfig, LiveResult, live_finetune
from core.finetune.lora import MAX_PHOTOS, MIN_PHOTOS, FinetuneConfig, pick_trigger, save_lora
from core.model.prompts import CLASS_PROMPT, instance_prompt
from core.plots import attack_curve, loss_curve
from ui.gpu import on_gpu, zero_gpu
from ui.protect_panel import create_protect_controls, protect_updates
from ui.session import SESSION_TTL, close_session, ensure, media, parse_seed
from ui.uploads import photo_lines, read_photos

EXAMPLES = ASSETS / "examples"
TRAIN_HANDLERS = 64  # visitors whose Train handlers can wait on the training hub at once

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
    shown = [
        (r.crop, f"photo {i}: {' '.join(r.notes)}") if r.notes else r.crop
        for i, r in enumerate(reads, 1)
        if r.crop is not None
    ]
    return shown, head, session


# the live attack during a fine-tune -----------------------------------------------------------

LIVE_SEEDS = (0, 1)  # reconstructions per checkpoint
LIVE_HEAD = "#### What an attacker rebuilds from the LoRA weights alone"
LIVE_INTRO = (
    f"{LIVE_HEAD}\nAt every checkpoint of the fine-tune, an attacker who sees **only the LoRA's weights** "
    "(not your photos, not your trigger word) reads them and draws the face it thinks the LoRA was "
    "trained on."
)


def live_score(
    step: int, attack: float, floor: float, ceiling: float | None, n_attack: int, n_floor: int, n_ceiling: int
) -> str:
    """The identity line under the live reconstruction (numbers from ``core.faces.utility.identity_distance``)."""
    if ceiling is not None:
        ceil = f"**{ceiling:.2f}**"
    else:
        ceil = "measuring on this step's preview samples..." if n_ceiling else "not measured (no previews in this run)"
    verdict = (
        f"The reconstruction is **closer to you than a random face** (by {floor - attack:.2f})."
        if attack < floor
        else "The reconstruction is not closer to you than a random face (yet)."
    )
    return (
        f"**Identity score at step {step}**: dlib distance of each set's mean face descriptor to your photos'; "
        f"lower = closer, below {SAME_PERSON} dlib counts it as the same person.\n"
        f"- the attacker's reconstruction ({n_attack} images, from the LoRA weights alone): **{attack:.2f}**\n"
        f'- floor, a random face from the base model ({n_floor} images of "{CLASS_PROMPT}"): **{floor:.2f}**\n'
        f"- ceiling, your LoRA used with the secret trigger, which the attacker does not have "
        f"({n_ceiling} preview images): {ceil}\n\n"
        f"{verdict} Compare with the floor rather than with {SAME_PERSON}: averaging descriptors pulls any set "
        "toward the average face, so even a random face is often below it."
    )


# defenses before sharing ------------------------------------------------------------------------

NO_DEFENSE = "none"
DEFENSE_CHOICES = [
    ("none", NO_DEFENSE),
    ("weight noise", "weight_noise"),
    ("prune", "prune"),
    ("quantize", "quantize"),
    ("rank truncation", "rank_truncate"),
]
# strength slider per post-hoc defense: (minimum, maximum, step, default, label, info)
DEFENSE_SLIDERS = {
    "weight_noise": (
        0.0,
        5.0,
        0.05,
        1.0,
        "Noise strength",
        "Gaussian noise added to every weight; its std relative to "
        "the typical size of the weights of that tensor (1 = noise as large as the weights)",
    ),
    "prune": (
        0.0,
        0.99,
        0.01,
        0.9,
        "Fraction of weights set to zero",
        "in every LoRA tensor, this share of its smallest weights becomes 0",
    ),
    "quantize": (
        2,
        16,
        1,
        4,
        "Bits per weight",
        "each tensor's weights rounded to 2^bits - 1 levels; fewer bits = coarser",
    ),
    "rank_truncate": (
        1,
        32,
        1,
        2,
        "Directions kept",
        "each layer's change B·A cut to its strongest directions (at or above the LoRA rank, nothing is cut)",
    ),
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


def epsilon_words(epsilon: float, n_photos: int) -> str:
    """The accountant's epsilon in plain words (per photo; roughly n x for a person with n photos)."""
    if not math.isfinite(epsilon):
        return "epsilon = ∞: with no noise, DP-SGD's clipping alone promises nothing"
    return (
        f"epsilon **{epsilon:.3g}** per photo (it covers any *one* photo, not you: a person with 5 photos has "
        f"roughly 5x that; with your {n_photos} photos, about {n_photos * epsilon:.3g})"
    )


def live_config(steps, rank, lr, seed, text_encoder, dp, dp_noise, defense, strength) -> LiveConfig:
    """The widgets' values -> the live job's config (gr.Error with the config's own sentence)."""
    try:
        seed = parse_seed(seed)
        ft = FinetuneConfig(
            steps=int(steps),
            rank=int(rank),
            alpha=float(rank),
            lr=float(lr),
            seed=seed,
            text_encoder=bool(text_encoder),
        )
        if defense in (None, "", NO_DEFENSE):
            defense, strength = None, None
        elif defense in DEFENSE_SLIDERS and strength in (None, ""):
            strength = DEFENSE_SLIDERS[defense][3]
        noise = (DP_DEFAULT_NOISE if dp_noise in (None, "") else float(dp_noise)) if dp else None
        return LiveConfig(ft, dp_noise=noise, defense=defense, strength=None if strength is None else float(strength))
    except (TypeError, ValueError) as e:
        raise gr.Error(f"{str(e)[:1].upper()}{str(e)[1:]}. Change this setting and press **Train** again.") from e


class LiveView:
    """What the tab shows of one run, updated event by event (no model work here)."""

    def __init__(self, cfg: LiveConfig, photos, n_floor: int):
        self.cfg, self.photos, self.n_floor = cfg, photos, n_floor
        self.tag = f" ({defense_words(cfg.defense, cfg.strength)})" if cfg.defense else ""
        self.steps, self.losses, self.inst, self.epsilon = [], [], [], None
        self.gallery, self.recon = [], []
        self.a_steps, self.a_dist, self.c_dist, self.floor = [], [], [], None

    def progress(self, ev: Progress) -> dict | None:
        self.steps.append(ev.step)
        self.losses.append(ev.metrics["loss"])
        self.inst.append(ev.metrics["instance_loss"])
        self.epsilon = ev.metrics.get("epsilon", self.epsilon)
        if ev.step % 5 and ev.step != ev.total:
            return None
        eps = f" DP-SGD: {epsilon_words(self.epsilon, len(self.photos))}." if self.epsilon is not None else ""
        return dict(
            status=f"Training step **{ev.step}/{ev.total}** ({ev.elapsed:.0f} s). Trigger word: "
            f"**{self.cfg.finetune.trigger}**.{eps}",
            loss=loss_curve(self.steps, self.losses, self.inst, ev.total),
        )

    def scores(self) -> dict:
        return dict(
            attack_score=live_score(
                self.a_steps[-1],
                self.a_dist[-1],
                self.floor,
                self.c_dist[-1],
                len(self.cfg.attack_seeds),
                self.n_floor,
                self.cfg.finetune.preview_n,
            ),
            attack_plot=attack_curve(self.a_steps, self.a_dist, self.c_dist, self.floor, self.cfg.finetune.steps),
        )

    def reconstruction(self, ev: Reconstruction) -> dict:
        self.recon = [(im, f"step {ev.step}") for im in ev.images] + self.recon  # newest first
        self.a_steps.append(ev.step)
        self.a_dist.append(ev.distance)
        self.c_dist.append(None)
        self.floor = ev.floor
        return dict(attack_head=f"{LIVE_HEAD}{self.tag}, step {ev.step}", attack_gallery=self.recon, **self.scores())

    def preview(self, ev: Preview) -> dict:
        self.gallery = (self.gallery + [(im, f"step {ev.step}{self.tag}") for im in ev.images])[-12:]
        out = dict(previews=self.gallery)
        if ev.distance is not None and self.a_steps and self.a_steps[-1] == ev.step:
            self.c_dist[-1] = ev.distance  # the ceiling at the step just attacked
            out.update(self.scores())
        return out


def done_text(r: LiveResult, cfg: LiveConfig, photos) -> tuple[str, str]:
    """(status, score) lines of a finished run."""
    res, u = r.result, r.utility
    words = defense_words(cfg.defense, cfg.strength) if cfg.defense else ""
    done = [
        f"Done: {res.steps_done} steps in {res.seconds:.0f} s. Trigger word: **{res.trigger}** "
        f"(prompt: *{instance_prompt(res.trigger)}*). Keep it to yourself: it is not in the file."
    ]
    if r.epsilon is not None:
        done.append(
            f"Trained with DP-SGD (noise multiplier {r.noise_multiplier:.3g}): {epsilon_words(r.epsilon, len(photos))}."
        )
    if cfg.defense:
        done.append(f"The file holds your LoRA after {words}; the Attack and Layers tabs look at this defended LoRA.")
    done.append("The **Attack** tab runs every weight-only attack on this LoRA.")
    verdict = (
        "the same person by dlib's rule (< 0.6)"
        if u.same_person
        else "not close enough to count as the same person (>= 0.6)"
    )
    score = (
        "**How well your LoRA draws you** (dlib identity distance of its 4 samples to your photos; lower is closer):\n"
        f"- your LoRA with the trigger word{' after ' + words if cfg.defense else ''}: **{u.distance:.2f}**, "
        f"{verdict}\n"
    )
    if r.utility_before_defense is not None:
        score += f"- the same LoRA before the defense: **{r.utility_before_defense.distance:.2f}**\n"
    score += f'- a random face from the base model ("{CLASS_PROMPT}"), for comparison: **{u.floor:.2f}**'
    return " ".join(done), score


def plan_text(cfg: LiveConfig) -> str:
    plan = []
    if cfg.dp_noise is not None:
        plan.append(f"training with DP-SGD (noise multiplier {cfg.dp_noise:g})")
    if cfg.defense:
        plan.append(
            f"{defense_words(cfg.defense, cfg.strength)} applied to the LoRA file you download and to every "
            "checkpoint the attacker reads"
        )
    return (" Defenses: " + "; ".join(plan) + ".") if plan else ""


def queue_words(ev: Queued, max_batch: int) -> str:
    est = f"about {ev.estimate_seconds:.0f} s" if ev.estimate_seconds is not None else "soon"
    return (
        f"**Waiting for a place:** you are number **{ev.position}** in the queue; {ev.training} visitors are "
        f"training now (up to {max_batch} train together on this machine). Your turn starts {est}."
    )


def training_words(ev: Training) -> str:
    if ev.alone_because:
        return f"Training alone: {ev.alone_because}."
    if ev.others:
        others = f"**{ev.others}** other visitor{'s' if ev.others != 1 else ''}"
        return f"Training together with {others} (one shared model pass)."
    return "Training."


def train_run(
    engine: Engine,
    session,
    steps,
    rank,
    lr,
    seed,
    text_encoder,
    dp=False,
    dp_noise=DP_DEFAULT_NOISE,
    defense=NO_DEFENSE,
    strength=None,
    protect=False,
    protect_budget=None,
    protect_purify=False,
):
    """The Train button: (optionally) protects the photos, submits the run to the app's training hub
    (:class:`core.finetune.hub.TrainingHub`, shared by every visitor) and maps its events to the tab's
    outputs. Yields dicts {output name: value} (names of ``FINETUNE_OUTPUTS``; missing ones stay)."""
    session = ensure(session)
    if len(session.crops) < MIN_PHOTOS:
        raise gr.Error(f"Add at least {MIN_PHOTOS} usable photos of one face first (you have {len(session.crops)}).")
    cfg = live_config(steps, rank, lr, seed, text_encoder, dp, dp_noise, defense, strength)
    cfg.finetune.trigger = pick_trigger(cfg.finetune)
    photos = session.crops[:MAX_PHOTOS]
    session.stop_requested = False
    should_stop = lambda: session.stop_requested or session.closed
    attacker, why = engine.attacker()
    view = LiveView(cfg, photos, len(engine.floor_images()))
    trigger = cfg.finetune.trigger
    yield dict(
        status=f"Preparing... your secret trigger word is **{trigger}** (prompt: *{instance_prompt(trigger)}*)."
        f"{plan_text(cfg)}",
        loss=None,
        previews=[],
        score="",
        download=None,
        session=session,
        attack_head=LIVE_INTRO
        if attacker is not None
        else f"{LIVE_HEAD}\n**The live attack is not available:** {why} The fine-tune works without it.",
        attack_photos=gr.update(value=list(photos), visible=attacker is not None),
        attack_gallery=gr.Gallery(value=[], visible=attacker is not None),
        attack_score="",
        attack_plot=gr.Plot(value=None, visible=attacker is not None),
    )
    train_photos = yield from protect_updates(engine, photos, protect, protect_budget, protect_purify, should_stop)
    if train_photos is None:
        return
    session.layer_steps.clear()
    if zero_gpu():  # no shared hub on ZeroGPU: this call holds the GPU (ui.gpu)
        events, max_batch = (
            live_finetune(engine.pipe, photos, cfg, attacker, engine.floor_images(), should_stop, train_photos),
            1,
        )
    else:
        hub = engine.hub()
        events, max_batch = hub.submit(photos, cfg, should_stop, train_photos=train_photos), hub.max_batch
    try:
        for ev in events:
            update = event_update(ev, view, session, engine, cfg, photos, max_batch, protected=protect)
            if update:
                yield {**update, "session": session}
    except Failed as e:
        raise gr.Error(str(e)) from e


def event_update(
    ev, view: LiveView, session, engine: Engine, cfg: LiveConfig, photos, max_batch: int, protected: bool = False
) -> dict | None:
    """One event of the visitor's run -> the outputs it changes."""
    if isinstance(ev, Queued):
        return dict(status=queue_words(ev, max_batch))
    if isinstance(ev, Training):
        return dict(status=training_words(ev))
    if isinstance(ev, Progress):
        return view.progress(ev)
    if isinstance(ev, LayerChanges):
        session.layer_steps[ev.step] = ev.changes  # the Layers tab's heatmap over the steps
        return None
    if isinstance(ev, Reconstruction):
        return view.reconstruction(ev)
    if isinstance(ev, AttackUnavailable):
        return dict(attack_head=f"{LIVE_HEAD}\n**{ev.reason}**")
    if isinstance(ev, Preview):
        return view.preview(ev)
    if isinstance(ev, Message) and ev.text.startswith("scoring"):
        return dict(status="Scoring the LoRA against your photos...")
    if isinstance(ev, Done) and ev.result is not None:
        session.result, session.trained_on = ev.result.result, list(photos)
        path = save_lora(session.dir / "lora.safetensors", ev.result.result, base_name=engine.model_name)
        status, score = done_text(ev.result, cfg, photos)
        if protected:
            status += (
                " The LoRA was trained on your **protected** (cloaked) photos; every score above compares with "
                "your originals."
            )
        return dict(status=status, score=score, download=str(path))
    if isinstance(ev, Done):
        return dict(status="Stopped. Press **Train** to start a new fine-tune.")
    return None


# outputs of the Train button, in the order of its event (the API returns all but the session)
FINETUNE_OUTPUTS = (
    "status",
    "loss",
    "previews",
    "score",
    "download",
    "session",
    "attack_head",
    "attack_photos",
    "attack_gallery",
    "attack_score",
    "attack_plot",
    "protect_gallery",
)


def create_defense_widgets():
    """The Defenses accordion: (DP switch, DP noise, post-hoc defense, its strength)."""
    with gr.Accordion("Defenses (what you can do before sharing)", open=False):
        gr.Markdown(DEFENSES_INTRO)
        dp = gr.Checkbox(
            value=False,
            label="Train with differential privacy (DP-SGD)",
            info="UNet LoRA only; each step costs more than a plain one",
        )
        dp_noise = gr.Slider(
            0.0,
            10.0,
            value=DP_DEFAULT_NOISE,
            step=0.1,
            label="DP noise multiplier σ",
            info="more noise: smaller epsilon (a stronger promise), and a LoRA that learns you less",
        )
        defense = gr.Dropdown(DEFENSE_CHOICES, value=NO_DEFENSE, label="Edit the LoRA before sharing it")
        lo, hi, st, val, lab, inf = DEFENSE_SLIDERS["prune"]
        strength = gr.Slider(lo, hi, value=val, step=st, label=lab, info=inf, visible=False)
        defense.change(defense_slider, defense, strength, queue=False, api_visibility="private")
    return dp, dp_noise, defense, strength


def create_run_outputs() -> dict:
    """The right-hand column: what the Train button shows, by the names of ``FINETUNE_OUTPUTS`` (all but
    the session and the protect panel's gallery)."""
    status = gr.Markdown("Upload photos, then press **Train**.")
    loss_plot = gr.Plot(label="Loss")
    previews = gr.Gallery(
        label="The LoRA's own samples with your trigger word, as it learns", columns=6, height=180, object_fit="contain"
    )
    score = gr.Markdown()
    download = gr.File(label="Your LoRA file (diffusers format; the trigger word is not in it)")
    attack_head = gr.Markdown(LIVE_INTRO)
    with gr.Row():
        attack_photos = gr.Gallery(
            label="Your photos (the attacker never sees them)", columns=3, height=180, object_fit="contain", scale=1
        )
        attack_gallery = gr.Gallery(
            label="The attacker's reconstructions, newest first", columns=6, height=180, object_fit="contain", scale=2
        )
    attack_score = gr.Markdown()
    attack_plot = gr.Plot(label="Identity distance over the fine-tune")
    return dict(
        status=status,
        loss=loss_plot,
        previews=previews,
        score=score,
        download=download,
        attack_head=attack_head,
        attack_photos=attack_photos,
        attack_gallery=attack_gallery,
        attack_score=attack_score,
        attack_plot=attack_plot,
    )


def create_photo_inputs(engine: Engine, session: gr.State) -> None:
    """The photo upload (and the example face), read into aligned crops the moment photos arrive."""
    files = gr.File(
        label=f"Your photos ({MIN_PHOTOS}-{MAX_PHOTOS} of one face)", file_count="multiple", type="filepath"
    )  # any file: one that is not a photo gets a sentence saying what to upload
    examples = example_sets()
    if examples:
        example_btn = gr.Button(
            f"Use the example face ({len(next(iter(examples.values())))} photos made by the base model)"
        )
    crops = gr.Gallery(
        label=f"Aligned crops the LoRA trains on ({engine.image_size} px)",
        columns=5,
        height=160,
        object_fit="contain",
    )
    report = gr.Markdown()

    def ingest(f, s, request: gr.Request):  # the crops are shown from files in the visitor's session dir
        shown, head, s = ingest_files(f, s, engine.image_size, request)
        return media(s, shown), head, s

    files.upload(ingest, [files, session], [crops, report, session], api_name="ingest")
    if examples:
        first = next(iter(examples.values()))

        def use_example(s, request: gr.Request):
            return ingest(first, s, request)

        example_btn.click(use_example, [session], [crops, report, session])


def create_training_settings():
    """The recipe's widgets: (steps, rank, learning rate, seed, text-encoder switch)."""
    with gr.Row():
        steps = gr.Slider(
            20,
            600,
            value=FinetuneConfig.steps,
            step=10,
            label="Training steps",
            info="more steps: the LoRA learns your face better, and leaks more",
        )
    with gr.Accordion("Advanced settings", open=False):
        rank = gr.Slider(1, 32, value=FinetuneConfig.rank, step=1, label="LoRA rank r")
        lr = gr.Number(value=FinetuneConfig.lr, label="Learning rate")
        seed = gr.Number(
            value=None, precision=0, label="Seed (empty = a fresh random one; it also picks the trigger word)"
        )
        text_encoder = gr.Checkbox(value=False, label="Also train a LoRA on the text encoder")
    return steps, rank, lr, seed, text_encoder


def create_finetune_tab(engine: Engine) -> gr.State:
    """The tab; returns the visitor's session state (other tabs read the fine-tuned LoRA from it)."""
    session = gr.State(None, time_to_live=SESSION_TTL, delete_callback=close_session)
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            create_photo_inputs(engine, session)
            steps, rank, lr, seed, text_encoder = create_training_settings()
            protect = create_protect_controls()
            dp, dp_noise, defense, strength = create_defense_widgets()
            with gr.Row():
                train = gr.Button("Train", variant="primary")
                stop = gr.Button("Stop")
        with gr.Column(scale=2):
            outputs = create_run_outputs()
    outputs.update(session=session, protect_gallery=protect.gallery)

    def run(
        session,
        steps,
        rank,
        lr,
        seed,
        text_encoder,
        dp,
        dp_noise,
        defense,
        strength,
        protect_on,
        budget,
        purify,
        request: gr.Request,
    ):
        session = ensure(session, request)  # registered under the browser session: its end deletes the files
        for update in train_run(
            engine,
            session,
            steps,
            rank,
            lr,
            seed,
            text_encoder,
            dp,
            dp_noise,
            defense,
            strength,
            protect_on,
            budget,
            purify,
        ):
            session = update.get("session", session)  # every image shown is a file in the visitor's session dir
            yield tuple(media(session, update.get(k, gr.skip())) for k in FINETUNE_OUTPUTS)

    # every visitor's handler only relays the events of the shared training hub, so many can wait at once;
    # the hub decides who trains together (core.finetune.hub)
    ev = train.click(
        on_gpu(run, 300),
        [session, steps, rank, lr, seed, text_encoder, dp, dp_noise, defense, strength, *protect.inputs],
        [outputs[k] for k in FINETUNE_OUTPUTS],
        concurrency_limit=TRAIN_HANDLERS,
        concurrency_id="finetune",
        api_name="train",
    )

    def request_stop(s):
        if s is not None:
            s.stop_requested = True  # the hub takes the run out at its next step
        return "Stopped. Press **Train** to start a new fine-tune."

    stop.click(request_stop, [session], outputs["status"], cancels=[ev], api_visibility="private")

    create_base_sampler(engine)
    return session


def create_base_sampler(engine: Engine) -> None:
    """The accordion that draws faces from the base model (no fine-tune)."""
    with gr.Accordion("The base model, before any fine-tune", open=False):
        gr.Markdown(
            f"Every fine-tune starts from this model (`{engine.model_name}`, {engine.image_size} px, on "
            f'`{engine.device}`). These faces are drawn from the prompt **"{CLASS_PROMPT}"**: they are '
            f"no one in particular."
        )
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
                raise gr.Error(str(e)) from e
            return engine.sample(req)

        draw.click(
            on_gpu(sample, 60), [s_seed, s_n, s_steps, s_guid], base_gallery, api_name="sample", concurrency_limit=2
        )
