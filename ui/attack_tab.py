"""Attack tab: any LoRA file for this base model (or the visitor's own) -> every weight-only attack.

Only wiring: validation (``core.finetune.lora_file``), the attacks (``core.attack.report``) and the identity
metric (``core.faces.utility``) live in ``core``. Uploaded files are deleted once read; nothing is logged.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from core.attack.attacker import ATTACK_W
from core.attack.baselines import FINEXTRACT_W
from core.attack.report import attack_lora, distances, recorded_steps
from core.engine import Engine
from core.faces.metrics import SAME_PERSON
from core.finetune.lora import MAX_PHOTOS, FinetuneConfig
from core.finetune.lora_file import MAX_BYTES as MAX_LORA_BYTES
from core.finetune.lora_file import LoRAFileError
from core.model.pipeline import EMBEDDED_NAME
from core.model.prompts import CLASS_PROMPT
from core.studies import measured_elsewhere
from core.studies.attack import load_report
from ui.finetune_tab import read_faces
from ui.gpu import on_gpu
from ui.lora_upload import describe_lora, lora_refusal, read_lora_upload
from ui.membership_panel import create_membership_panel
from ui.metadata_panel import READ_KEY, create_metadata_panel, remember_refusal, scan_arrived
from ui.session import ensure, media
from ui.uploads import UploadError, local_file

INTRO = f"""
### Attack a shared LoRA
Someone fine-tuned a LoRA on photos of a person and shared the file. The **attacker** has:
- the LoRA file (its weights), and the public base model it was fine-tuned from;
- an encoder it trained beforehand on *shadow* LoRAs it fine-tuned itself on photos of other, public people
  (Yao, arXiv 2409.08482).

The attacker does **not** have the training photos, the secret trigger word or any prompt. Its
encoder reads the weights (and the number of fine-tuning steps) and writes a prompt for the LoRA's own
model, which then draws the face, each drawing step pushed {ATTACK_W:g}x away from what the base model would
draw for the same prompt (so what the fine-tune added stands out).

Beside it, two attacks anyone can run with the file alone, no training: **naive** (the LoRA with the
ordinary prompt "{CLASS_PROMPT}") and **FineXtract-style** (the base model's prediction pushed {FINEXTRACT_W:g}x
toward the LoRA's, Wu et al. 2024). With reference photos of the person, each set of images is scored
by dlib identity distance, next to the **floor**: a random face from the base model.

"""


def measured_text(report: dict | None = None, base: str | None = None) -> str:
    """What the attack evaluation measured, in words, from ``docs/results/attack.json`` (so the tab
    never quotes numbers the repository's own evaluation did not produce)."""
    r = load_report() if report is None else report
    if not r or not r.get("rows"):
        return (
            "*Not measured yet on this base model:* `python -m core.studies.attack` writes the numbers this tab quotes."
        )
    rows, n = r["rows"], r["n"]

    def pick(prefix):
        if prefix in rows:
            return prefix, rows[prefix]
        return next(((k, v) for k, v in rows.items() if k.startswith(prefix) and "@ step" not in k), (None, None))

    said = []
    for prefix, words in (
        ("attacker + extrapolation", "the attacker's prompt with extrapolation (as shown here)"),
        ("attacker", "the trained attacker's prompt alone"),
        ("FineXtract", "FineXtract-style"),
        ("naive (class", "naive"),
        ("ceiling", "the LoRA with its secret trigger (which the attacker does not have)"),
        ("floor", "a random face from the base model"),
    ):
        k, v = pick(prefix)
        if v is not None and k not in {x[0] for x in said}:
            said.append((k, f"{words}: **{v['top1']:.0%}**"))
    elsewhere = measured_elsewhere(r, base, "python -m core.studies.attack --n 50")
    return (elsewhere + "\n\n" if elsewhere else "") + (
        f"*Measured on {n} people the models never saw (README, `python -m core.studies.attack`):* how often 4 images "
        f"pick the right person out of {n} (chance {1 / n:.0%}): " + "; ".join(w for _, w in said) + "."
    )


def lora_arrived(engine: Engine, lora_path, session) -> str:
    """The status line the moment a LoRA file arrives. Its one reading (:mod:`ui.uploads`: an upload is
    read once, then gone) serves both the check (kept in the session for the Attack button) and the
    metadata panel's scan (kept for its button). Both buttons call this first too (an event of theirs
    can run before the upload's own): whoever comes first reads, the others find what it made."""
    with session.reading:
        if str(lora_path) in session.reads or READ_KEY + str(lora_path) in session.reads:
            return checked_text(engine, lora_path, session)
        try:
            with local_file(lora_path, session, MAX_LORA_BYTES) as path:
                scan_arrived(lora_path, path, session)
                return checked_text(engine, lora_path, session)
        except UploadError as e:
            err = lora_refusal(lora_path, e)
            if err.reason != "upload":  # too large: both buttons say so again (the file itself is gone)
                session.remember(str(lora_path), err)
                remember_refusal(lora_path, str(err), session)
            return refused(str(err))[0]


def attacker_for(engine: Engine):
    """(the trained attacker or None, why not): on another base than the embedded one, the sentence says
    plainly that the trained attacker exists only for the embedded base."""
    attacker, why = engine.attacker()
    if attacker is None and engine.model_name != EMBEDDED_NAME:
        why = (
            f"The trained attacker exists only for the embedded base model (the miniature model it was trained "
            f"on); none has been trained for `{engine.model_name}`. Train one for it with `python -m "
            f"core.attack.shadow --model {engine.model_name}` and `python -m core.attack.train --model "
            f"{engine.model_name}` (README: *Training the attacker for another base*)."
        )
    return attacker, why


def _gallery(images, seeds):
    return [(im, f"seed {s}") for im, s in zip(images or [], seeds)]


def score_table(engine: Engine, images, photos, label: str) -> str:
    """The distance table of one attacked LoRA (or a sentence when there is nothing to score against)."""
    if not photos:
        return (
            "**No identity score:** without reference photos of the person there is nothing to score the "
            "images against. Add 1-10 photos of them (they stay in your session), or attack the LoRA you "
            "fine-tuned in this session."
        )
    floor_images = engine.floor_images()
    d = distances(
        {
            "attack": images.attack,
            "naive": images.naive,
            "finextract": images.finextract,
            "ceiling": images.ceiling,
            "floor": floor_images,
        },
        photos,
    )
    n = len(images.seeds)
    rows = [
        ("the attacker's reconstruction", "the LoRA weights and a trained encoder", d["attack"]),
        (f'naive: the LoRA with "{CLASS_PROMPT}"', "the LoRA file only", d["naive"]),
        (f"FineXtract-style (w = {FINEXTRACT_W:g})", "the LoRA file only", d["finextract"]),
    ]
    if images.ceiling is not None:
        rows.append(
            ("ceiling: your LoRA with its secret trigger", "the trigger word, which the attacker lacks", d["ceiling"])
        )
    floor = d["floor"]

    def vs_floor(x):
        if x is None:
            return ""
        return f"{floor - x:.2f} closer" if x < floor else f"{x - floor:.2f} farther"

    lines = [
        f"**Identity distance to {label}**: dlib distance of each set's mean face descriptor to the photos' "
        f"mean ({n} images per set, {len(floor_images)} for the floor); lower = closer, below {SAME_PERSON} "
        "dlib counts it as the same person.",
        "",
        "| images | what it needs | distance | than the floor |",
        "|---|---|---|---|",
    ]
    for name, needs, x in rows:
        shown = "not available" if x is None else f"**{x:.2f}**"
        lines.append(f"| {name} | {needs} | {shown} | {vs_floor(x)} |")
    lines.append(f'| floor: a random face from the base model ("{CLASS_PROMPT}") | nothing | **{floor:.2f}** | |')
    lines += [
        "",
        f"Compare each row with the floor rather than with {SAME_PERSON}: averaging descriptors pulls any "
        "set toward the average face, so even a random face is often below it.",
    ]
    return "\n".join(lines)


def render(engine: Engine, images, head: str, photos, label: str):
    """(status, attack gallery, naive gallery, FineXtract gallery, reference gallery, table)."""
    if images.attack is None:
        head += (
            f"\n\n**The trained attacker did not run:** {images.attack_note} The two attacks that need no "
            "training are shown."
        )
    return (
        head,
        _gallery(images.attack, images.seeds),
        _gallery(images.naive, images.seeds),
        _gallery(images.finextract, images.seeds),
        list(photos or []),
        score_table(engine, images, photos, label),
    )


def refused(message: str):
    return (f"**This file was refused.** {message}", [], [], [], [], "")


def checked_text(engine: Engine, lora_path, session) -> str:
    """The status line once a LoRA file arrives: checked (and kept in the session), or refused."""
    try:
        lora = read_lora_upload(engine, lora_path, session)
    except LoRAFileError as e:
        return refused(str(e))[0]
    return f"**LoRA file checked**: {describe_lora(lora)}. Press **Attack this LoRA file**."


def attack_file(engine: Engine, lora_path, steps, ref_files, session):
    """The "Attack this LoRA file" button."""
    refs, ref_lines, ref_notes = read_faces(ref_files, engine.image_size, session)  # also deletes the photo uploads
    if not lora_path:
        raise gr.Error("Upload a LoRA .safetensors file first.")
    if session is not None:
        lora_arrived(engine, lora_path, session)  # (the one reading of an upload, if its own event has not run)
    try:
        lora = read_lora_upload(engine, lora_path, session)
    except LoRAFileError as e:
        return refused(str(e))
    step = recorded_steps(lora.meta)
    if step is not None:
        step_from = "recorded in the file"
    else:
        try:
            step = int(steps)
        except (TypeError, ValueError):
            raise gr.Error("Enter the number of fine-tuning steps of this LoRA (a whole number, e.g. 80).") from None
        if not 1 <= step <= 100_000:
            raise gr.Error(f"Fine-tuning steps must be 1 to 100000, got {step}.")
        step_from = "from your input: the file does not record it"
    notes = list(lora.notes)
    if len(refs) > MAX_PHOTOS:
        notes.append(f"only the first {MAX_PHOTOS} reference photos are used")
        refs = refs[:MAX_PHOTOS]
    if ref_lines:
        notes.append("reference photos left out:\n" + "\n".join(ref_lines))
    if ref_notes:
        notes.append("about the reference photos:\n" + "\n".join(ref_notes))
    if refs:
        photos, label = refs, "your reference photos"
    elif session is not None and session.trained_on:
        photos, label = (
            session.trained_on,
            ("the photos you fine-tuned on in this session (meaningful only if this LoRA was trained on them)"),
        )
    else:
        photos, label = [], ""
    attacker, why = attacker_for(engine)
    images = attack_lora(engine.pipe, attacker, lora.lora, step, lora.alpha, attacker_note=why)
    head = f"**Attacked the uploaded LoRA**: {describe_lora(lora)}; fine-tuning step {step} ({step_from})."
    if notes:
        head += "\n" + "\n".join(f"- {n}" for n in notes)
    return render(engine, images, head, photos, label)


def attack_mine(engine: Engine, session):
    """The "Attack my LoRA from the Fine-tune tab" button: the session's LoRA, scored against the
    photos it was fine-tuned on (and with its trigger, the ceiling)."""
    if session is None or session.result is None:
        raise gr.Error(
            "You have not fine-tuned a LoRA in this session yet: train one in the Fine-tune tab first, "
            "or upload a LoRA file."
        )
    res = session.result
    photos = list(session.trained_on or session.crops[:MAX_PHOTOS])
    attacker, why = attacker_for(engine)
    images = attack_lora(
        engine.pipe, attacker, res.lora, res.steps_done, res.config.alpha, trigger=res.trigger, attacker_note=why
    )
    head = (
        f"**Attacked your LoRA from the Fine-tune tab** ({res.steps_done} steps, rank {res.config.rank}). "
        "The attacker used its weights and step count only; the ceiling row uses your secret trigger."
    )
    return render(engine, images, head, photos, "the photos you fine-tuned on")


@dataclass
class AttackWidgets:
    """The tab's inputs (left column) and what the attack shows (right column)."""

    lora_file: gr.File
    steps: gr.Number
    refs: gr.File
    attack_btn: gr.Button
    mine_btn: gr.Button
    status: gr.Markdown
    attack_gal: gr.Gallery
    naive_gal: gr.Gallery
    fx_gal: gr.Gallery
    ref_gal: gr.Gallery
    table: gr.Markdown

    def outputs(self, session: gr.State) -> list:
        """An attack's outputs, in the order of :func:`render`'s values, then the session."""
        return [self.status, self.attack_gal, self.naive_gal, self.fx_gal, self.ref_gal, self.table, session]


def create_attack_widgets() -> AttackWidgets:
    """The layout: the visitor's inputs on the left, what the attacker rebuilt and its scores on the right."""
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            lora_file = gr.File(
                label="A LoRA file (.safetensors; diffusers, peft or kohya / A1111) fine-tuned from this app's base "
                "model",
                type="filepath",
            )
            steps = gr.Number(
                value=FinetuneConfig.steps,
                precision=0,
                label="Fine-tuning steps of this LoRA",
                info="read from the file when it records them (files from the Fine-tune tab do); "
                "otherwise this number is used",
            )
            refs = gr.File(
                label=f"Optional: 1-{MAX_PHOTOS} photos of the person, to score the attack against",
                file_count="multiple",
                type="filepath",
            )
            attack_btn = gr.Button("Attack this LoRA file", variant="primary")
            mine_btn = gr.Button("Attack my LoRA from the Fine-tune tab", visible=False)
        with gr.Column(scale=2):
            status = gr.Markdown("Upload a LoRA file, then press **Attack this LoRA file**.")
            attack_gal = gr.Gallery(
                label="What the attacker rebuilds from the weights alone", columns=4, height=180, object_fit="contain"
            )
            with gr.Row():
                naive_gal = gr.Gallery(
                    label=f'Naive: the LoRA with "{CLASS_PROMPT}"', columns=4, height=160, object_fit="contain"
                )
                fx_gal = gr.Gallery(label="FineXtract-style extrapolation", columns=4, height=160, object_fit="contain")
            ref_gal = gr.Gallery(
                label="Reference photos the images are scored against", columns=6, height=120, object_fit="contain"
            )
            table = gr.Markdown()
    return AttackWidgets(
        lora_file, steps, refs, attack_btn, mine_btn, status, attack_gal, naive_gal, fx_gal, ref_gal, table
    )


def create_attack_tab(engine: Engine, session: gr.State, tab: gr.Tab | None = None) -> None:
    gr.Markdown(INTRO + "\n" + measured_text(base=engine.fingerprint))
    w = create_attack_widgets()
    create_metadata_panel(w.lora_file, session, read_input=lambda f, s: lora_arrived(engine, f, s))
    outputs = w.outputs(session)

    def shown(out, s, request=None):
        """The tab's outputs with every image a file in the visitor's session dir (and the session)."""
        s = ensure(s, request)
        return (*(media(s, v) for v in out), s)

    def attack_upload(f, n, r, s, request: gr.Request):
        s = ensure(s, request)  # only this visitor's own uploads are read
        return shown(attack_file(engine, f, n, r, s), s)

    # each upload is read the moment it arrives (an upload left unread is deleted within a minute,
    # ui.uploads); the Attack button then finds what came of it in the session
    def on_lora(f, s, request: gr.Request):
        s = ensure(s, request)
        return (lora_arrived(engine, f, s) if f else gr.skip()), s

    def refs_arrived(r, s, request: gr.Request):
        s = ensure(s, request)
        crops, left, notes = read_faces(r, engine.image_size, s)
        return media(s, crops), s

    w.lora_file.upload(on_lora, [w.lora_file, session], [w.status, session], api_visibility="private")
    w.refs.upload(refs_arrived, [w.refs, session], [w.ref_gal, session], api_visibility="private")

    w.attack_btn.click(
        on_gpu(attack_upload, 60),
        [w.lora_file, w.steps, w.refs, session],
        outputs,
        api_name="attack",
        concurrency_limit=1,
        concurrency_id="attack",
    )

    def mine(s, request: gr.Request):
        return shown(attack_mine(engine, s), s, request)

    w.mine_btn.click(
        on_gpu(mine, 60), [session], outputs, api_name="attack_mine", concurrency_limit=1, concurrency_id="attack"
    )
    if tab is not None:  # the button appears once the visitor has fine-tuned a LoRA in this session
        tab.select(
            lambda s: gr.Button(visible=s is not None and s.result is not None),
            [session],
            [w.mine_btn],
            queue=False,
            api_visibility="private",
        )
    with gr.Accordion("Was my photo used? (membership inference)", open=False):
        create_membership_panel(engine, session)
