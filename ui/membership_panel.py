"""Was my photo used? The visitor drops photos and a LoRA (their own from the Fine-tune tab, or any LoRA
file for this base) and sees, per photo, a membership score against the calibrated threshold, with what
it means.

Only wiring: the score and its calibration live in ``core.attack.membership``; the threshold and the
measured reliability come from ``docs/results/membership.json`` (``python -m core.studies.membership``),
used only when it was measured on this base model. Only the visitor's own uploads are read, once, when
they arrive, then deleted (``ui.uploads``; the button finds what came of them in the session); nothing is
logged. Mount with ``create_membership_panel(engine, session)`` inside a tab
(the Attack tab does, at its end).
"""

from __future__ import annotations

import gradio as gr

from core import load_report
from core.attack.membership import MembershipConfig, config_of_calibration, load_calibration, membership_scores
from core.attack.report import recorded_steps
from core.finetune.lora import MAX_PHOTOS
from ui.gpu import on_gpu
from ui.session import ensure, media

INTRO = """
#### Was my photo used to train this LoRA?
A fine-tune fits the photos it trained on more closely than any other photo, even other photos of the same
person. The app adds noise to your photo at a few fixed strengths and asks both the LoRA's model and the
public base model to remove it: the **score** is how much more easily the LoRA's model does it (the log of
the base model's error over the LoRA model's, averaged; 0 = no easier). It needs only the LoRA file and the
base model: no trigger word, no other photos. Drop 1-10 photos, and a LoRA file (or leave it empty to check
the LoRA you fine-tuned in this session).
"""


def calibration(engine):
    """(the calibration for this base or None, a sentence why not, the study's report or None)."""
    report = load_report("membership")
    cal, why = load_calibration(report, engine.fingerprint)
    return cal, why, report if cal is not None else None


def reliability(report: dict) -> str:
    """What the study measured about the threshold, in words."""
    c = report["calibration"]
    row = report["rows"].get(str(c["steps"]))
    if not row:
        return ""
    return (
        f"Measured on {report['n_victims']} people none of whose photos the threshold was set on "
        f"(`python -m core.studies.membership`): it flags **{row['tpr']['rate']:.0%}** of the photos a LoRA was "
        f"trained on, **{row['fpr_unseen']['rate']:.0%}** of the same people's photos it was *not* trained on, and "
        f"{row['fpr_others']['rate']:.0%} of other people's photos (ROC AUC {row['auc_unseen']['auc']:.2f} for "
        "training photos against unseen photos of the same person; 1 = always right, 0.5 = a coin)."
    )


def verdict(scores, cal, why: str, report, steps: int | None) -> str:
    """The markdown verdict for the photos' scores."""
    lines = ["| photo | score | reading |", "|---|---|---|"]
    for i, s in enumerate(scores, 1):
        if cal is None:
            reading = "no calibrated threshold on this base model"
        elif cal.above(s):
            reading = f"**above** the threshold ({cal.threshold:+.3f}): probably in the training set"
        else:
            reading = f"below the threshold ({cal.threshold:+.3f}): no evidence it was used"
        lines.append(f"| {i} | {s:+.3f} | {reading} |")
    if cal is None:
        return "\n".join(lines + ["", f"**Scores only:** {why}"])
    text = [
        "",
        f"**How to read it.** The threshold was calibrated on {cal.n_loras} other people's {cal.steps}-step LoRAs so "
        f"that only {cal.fpr_target:.0%} of photos a LoRA was *not* trained on (other photos of the same person) "
        "score above it. Above it: this LoRA fits the photo as closely as it fits its own training photos. Below it "
        "is weaker evidence of absence than above is of presence: some training photos score low too.",
        reliability(report),
    ]
    if steps is not None and steps != cal.steps:
        text.append(
            f"*This LoRA records {steps} fine-tuning steps, the threshold was set for {cal.steps}:* a longer fine-tune "
            "fits its photos more closely (every score rises), a shorter one less, so read the verdict with care."
        )
    return "\n".join(lines + text)


def which_lora(engine, session, lora_path):
    """(lora, alpha, steps or None, words) from an uploaded file, else the session's own LoRA; gr.Error when neither."""
    from core.finetune.lora_file import LoRAFileError

    if lora_path:
        from ui.lora_upload import read_lora_upload

        try:
            v = read_lora_upload(engine, lora_path, session, need_unet=False)
        except LoRAFileError as e:
            raise gr.Error(f"This LoRA file was refused: {e}") from e
        return v.lora, v.alpha, recorded_steps(v.meta), "the uploaded LoRA file"
    if session is None or session.result is None:
        raise gr.Error("Upload a LoRA file, or fine-tune one in the Fine-tune tab first.")
    r = session.result
    return r.lora, r.config.alpha, r.steps_done, "your LoRA from the Fine-tune tab"


def lora_checked(engine, session, lora_path) -> str:
    """The panel's line the moment a LoRA file arrives: checked (and kept in the session), or refused."""
    from core.finetune.lora_file import LoRAFileError
    from ui.lora_upload import describe_lora, read_lora_upload

    try:
        v = read_lora_upload(engine, lora_path, session, need_unet=False)
    except LoRAFileError as e:
        return f"**This LoRA file was refused.** {e}"
    return f"**LoRA file checked**: {describe_lora(v)}. Add your photos and press **Was my photo used?**."


def check(engine, session, lora_path, photo_files):
    """The button: (verdict markdown, the photos with their scores, session)."""
    from ui.finetune_tab import read_faces

    session = ensure(session)
    crops, refused, notes = read_faces(photo_files, engine.image_size, session)  # only the visitor's own uploads
    if not crops:
        why = ("\n" + "\n".join(refused)) if refused else ""
        raise gr.Error(f"Add 1-{MAX_PHOTOS} photos with one face each.{why}")
    crops = crops[:MAX_PHOTOS]
    lora, alpha, steps, words = which_lora(engine, session, lora_path)
    cal, why, report = calibration(engine)
    cfg = config_of_calibration(cal) if cal is not None else MembershipConfig()
    scores = [float(s) for s in membership_scores(engine.pipe, lora, crops, cfg, alpha=alpha)]
    head = f"**Membership check of {len(crops)} photo{'s' if len(crops) > 1 else ''} against {words}.**"
    if refused:
        head += " Photos left out:\n" + "\n".join(refused)
    if notes:
        head += "\n\nPlease check:\n" + "\n".join(notes)
    shown = [
        (c, f"photo {i}: score {s:+.3f}" + ("" if cal is None else " (above)" if cal.above(s) else " (below)"))
        for i, (c, s) in enumerate(zip(crops, scores), 1)
    ]
    return head + "\n\n" + verdict(scores, cal, why, report, steps), media(session, shown), session


def create_membership_panel(engine, session: gr.State) -> None:
    """The panel: photos, an optional LoRA file, the button, the verdict."""
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            photos = gr.File(label=f"Your photo(s) (1-{MAX_PHOTOS})", file_count="multiple", type="filepath")
            lora_file = gr.File(
                label="A LoRA file (.safetensors); empty = your LoRA from the Fine-tune tab", type="filepath"
            )
            go = gr.Button("Was my photo used?", variant="primary")
        with gr.Column(scale=2):
            out = gr.Markdown()
            gallery = gr.Gallery(label="Your photos and their scores", columns=5, height=160, object_fit="contain")

    def run(s, f, p, request: gr.Request):
        return check(engine, ensure(s, request), f, p)

    # each upload is read the moment it arrives (an upload left unread is deleted within a minute,
    # ui.uploads); the button then finds what came of it in the session
    def photos_arrived(p, s, request: gr.Request):
        from ui.finetune_tab import read_faces

        s = ensure(s, request)
        crops, left, notes = read_faces(p, engine.image_size, s)
        return media(s, crops), s

    def lora_arrived(f, s, request: gr.Request):
        s = ensure(s, request)
        return (lora_checked(engine, s, f) if f else gr.skip()), s

    photos.upload(photos_arrived, [photos, session], [gallery, session], api_visibility="private")
    lora_file.upload(lora_arrived, [lora_file, session], [out, session], api_visibility="private")
    go.click(
        on_gpu(run, 60),
        [session, lora_file, photos],
        [out, gallery, session],
        api_name="membership",
        concurrency_limit=1,
        concurrency_id="attack",
    )
