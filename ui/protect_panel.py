"""Protect my photos first: cloak the visitor's photos before the fine-tune (and, optionally, purify them
the way an attacker or an upload pipeline would), so the visitor sees the LoRA and the live attack with
and without protection.

Only wiring: the cloak and the purification live in ``core.defenses.cloak`` / ``core.defenses.purify``.
Two uses:
- in the Fine-tune tab, :func:`create_protect_controls` (the switch, budget, purify box and a gallery of
  originals beside their cloaked versions) and :func:`protect_updates`, which the Train button's job runs
  before the fine-tune (see its docstring for the wiring);
- anywhere else, :func:`create_cloak_preview`: a button that cloaks the photos of the visitor's session
  and shows them beside the originals with their PSNR (mounted in the Defenses tab).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from core.defenses.cloak import CloakConfig, protect_photos
from core.defenses.purify import PurifyConfig
from core.events import Done, Message, Progress, never
from core.finetune.lora import MAX_PHOTOS
from ui.gpu import on_gpu
from ui.session import ensure, media

BUDGETS = (2, 16)  # slider range of the cloak's budget (0-255 scale)
PROTECT_INTRO = f"""
**Protect my photos first** adds a faint, deliberately chosen pattern to each photo *before* the fine-tune
(an adversarial "cloak", as in Anti-DreamBooth): it is computed to make the model's training on these photos
as hard as possible. **Budget**: no colour value of any pixel changes by more than this (out of 255).
**Purify as an attacker would**: the cloaked photos then go through {PurifyConfig().words()} (what a
determined attacker, or a social network's upload pipeline, does to photos); research found this often
washes cloaks out. Each cloaked photo is shown beside its original with its **PSNR** (peak signal-to-noise
ratio against the original, in dB: higher = less visible; an identical photo has infinite PSNR).
"""


@dataclass
class ProtectControls:
    switch: gr.Checkbox
    budget: gr.Slider
    purify: gr.Checkbox
    gallery: gr.Gallery

    @property
    def inputs(self) -> list:
        """The Train button's extra inputs, in :func:`protect_updates`' argument order."""
        return [self.switch, self.budget, self.purify]


def create_protect_controls(open_: bool = False) -> ProtectControls:
    """The switch, the budget, the purify box and the gallery of originals beside their cloaked versions."""
    with gr.Accordion("Protect my photos first (cloaking)", open=open_):
        gr.Markdown(PROTECT_INTRO)
        switch = gr.Checkbox(
            value=False,
            label="Protect my photos first",
            info="cloak the photos, then fine-tune on the cloaked ones; scores still compare with your originals",
        )
        budget = gr.Slider(
            *BUDGETS,
            value=CloakConfig.budget,
            step=1,
            label="Cloak budget (largest change of a pixel value, of 255)",
            info="larger: stronger cloak, more visible",
        )
        purify = gr.Checkbox(
            value=False,
            label="Purify as an attacker would",
            info=f"{PurifyConfig().words()}, applied to the cloaked photos before the fine-tune",
        )
        gallery = gr.Gallery(
            label="Your photos (left) and what the fine-tune trains on (right)",
            columns=4,
            height=200,
            object_fit="contain",
            visible=False,
        )
    return ProtectControls(switch, budget, purify, gallery)


def resolve(budget, purify) -> tuple[CloakConfig, PurifyConfig | None]:
    """The cloak and purification settings of the widgets' values; gr.Error when unusable."""
    try:
        cfg = CloakConfig(budget=float(CloakConfig.budget if budget in (None, "") else budget))
    except (TypeError, ValueError) as e:
        raise gr.Error(f"Bad cloak budget: {e}") from e
    return cfg, (PurifyConfig() if purify else None)


def pairs(result) -> list:
    """Gallery items: each original beside the photo the fine-tune trains on, with what was done and the PSNR."""
    from core.defenses.cloak import psnr

    out = []
    trained = result.photos
    for i, (orig, cl, p) in enumerate(zip(result.cloak.originals, trained, result.cloak.psnr), 1):
        shown = psnr(cl, orig) if result.purified is not None else p
        what = "cloaked + purified" if result.purified is not None else "cloaked"
        out += [(orig, f"photo {i}: original"), (cl, f"photo {i}: {what}, PSNR {shown:.1f} dB")]
    return out


def summary(result, next_step: str = "what the fine-tune below shows") -> str:
    c = result.cloak
    psnrs = list(c.psnr)
    text = (
        f"**Cloaked {len(c.cloaked)} photos** in {c.seconds:.1f} s (budget {c.config.budget:g}/255, {c.steps_done} "
        f"steps): PSNR {min(psnrs):.1f}-{max(psnrs):.1f} dB against your originals. The cloak raised the model's "
        f"training loss on them by **{c.loss_cloaked / c.loss_clean - 1:+.0%}** (its own surrogate, fixed draws): "
        f"that is what it aims at; whether a LoRA still learns your face from them is {next_step}."
    )
    if result.purified is not None:
        text += f" Then purified as an attacker would: {result.purify_words}."
    return text


def protect_updates(engine, photos, protect: bool, budget, purify: bool, should_stop=never):
    """Generator for the Train button's job: yields ``{"status": ..., "protect_gallery": ...}`` updates
    while cloaking and **returns** the photos to fine-tune on (the originals when ``protect`` is off, or
    ``None`` when cancelled). The live attack and every score keep comparing with ``photos``, the
    visitor's originals. Wiring in ``ui.finetune_tab.train_run``::

        train_photos = yield from protect_updates(engine, photos, protect, budget, purify)
        if train_photos is None:
            return
        events = finetune(engine.pipe, train_photos, run_cfg)  # (dp_finetune likewise)

    with ``protect_gallery`` added to ``FINETUNE_OUTPUTS`` (``ProtectControls.gallery``) and
    ``ProtectControls.inputs`` to the Train button's inputs."""
    if not protect:
        yield {"protect_gallery": gr.update(value=[], visible=False)}
        return list(photos)
    cfg, pcfg = resolve(budget, purify)
    yield {
        "status": f"Cloaking your {len(photos)} photos (budget {cfg.budget:g}/255)...",
        "protect_gallery": gr.update(value=[], visible=True),
    }
    for ev in protect_photos(engine.pipe, photos, cfg, pcfg, should_stop, cores=engine.free_cores()):
        if isinstance(ev, Progress):
            yield {"status": f"Cloaking your photos: step **{ev.step}/{ev.total}** ({ev.elapsed:.0f} s)."}
        elif isinstance(ev, Message):
            continue
        elif isinstance(ev, Done):
            if ev.cancelled or ev.result is None:
                yield {"status": "Cloaking stopped; nothing was fine-tuned."}
                return None
            # gr.update, not a Gallery: ui.session.media turns its images into files of the visitor's session dir
            yield {"status": summary(ev.result), "protect_gallery": gr.update(value=pairs(ev.result), visible=True)}
            return list(ev.result.photos)
    return None


# a stand-alone preview (the Defenses tab) --------------------------------------------------------


PREVIEW_INTRO = """
#### Try it on your photos
Cloak the photos you uploaded in the **Fine-tune** tab and look at them beside the originals. (To see whether
the cloak stops a LoRA from learning your face, tick **Protect my photos first** there and train.)
"""


def cloak_preview(engine, session, budget, purify):
    """The "Cloak my photos" button: (status, gallery) for the session's photos."""
    session = ensure(session)
    photos = session.crops[:MAX_PHOTOS]
    if not photos:
        return (
            (
                "**No photos yet.** Upload photos of one face in the **Fine-tune** tab (or use the example face), "
                "then come back."
            ),
            [],
            session,
        )
    result = None
    for ev in protect_photos(engine.pipe, photos, *resolve(budget, purify), cores=engine.free_cores()):
        if isinstance(ev, Done):
            result = ev.result
    words = (
        "what the cloaking study above measured, and what the Fine-tune tab's *Protect my photos first* switch shows"
    )
    return summary(result, words), media(session, pairs(result)), session


def create_cloak_preview(engine, session: gr.State) -> None:
    """A "Cloak my photos" section for any tab (reads the photos of the visitor's session)."""
    gr.Markdown(PREVIEW_INTRO)
    with gr.Row():
        budget = gr.Slider(*BUDGETS, value=CloakConfig.budget, step=1, label="Cloak budget (of 255)")
        purify = gr.Checkbox(value=False, label="Purify as an attacker would", info=PurifyConfig().words())
    go = gr.Button("Cloak my photos")
    status = gr.Markdown()
    gallery = gr.Gallery(
        label="Your photos (left) beside their cloaked versions (right)", columns=4, height=220, object_fit="contain"
    )

    def run(s, b, p, request: gr.Request):  # registered under the browser session: its end deletes the files
        return cloak_preview(engine, ensure(s, request), b, p)

    go.click(
        on_gpu(run, 120),
        [session, budget, purify],
        [status, gallery, session],
        api_name="cloak_preview",
        concurrency_limit=1,
        concurrency_id="cloak",
    )
