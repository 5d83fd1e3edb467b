"""Watermark tab: the model owner's view. Does the visitor's LoRA, put on the watermarked base, still
carry the owner's watermark? AIAO (hidden in lazy layers) beside the baseline trigger-prompt backdoor.

Only wiring: embedding and verification live in ``core.watermark.aiao`` / ``core.watermark.backdoor``.
The watermarked bases ship as deltas over the embedded base with their keys (``assets/watermark``,
loaded by :func:`core.watermark.shipped.shipped_watermark`); a missing one is named plainly, with the
command that builds it, and nothing is shown in its place.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from core.engine import Engine, watermarked_base
from core.watermark.formats import SHIPPED
from ui.gpu import on_gpu
from ui.session import ensure, media

WATERMARKS = tuple(SHIPPED)  # "AIAO", "backdoor"
SUBPATH_ROWS = 8

INTRO = """
### Watermark: can the model's owner still recognise it after your fine-tune?
The owner of a base model can hide a secret watermark in it and later check whether someone's model
was built from it. Liu et al. (*Lazy Layers to Make Fine-Tuned Diffusion Models More Traceable*, arXiv
2405.00466) hide it in **lazy layers**, the ones fine-tunes barely move (see the **Layers** tab): a secret
*trigger* rewrites the signs of chosen numbers inside one lazy layer, and the watermarked model answers
with a secret sign pattern in a later lazy layer (**AIAO**). The classic alternative is a **backdoor**: a
secret prompt that makes the model draw a fixed pattern (here a checkerboard); fine-tuning tends to erase it.

Here the app plays the owner: it puts **your LoRA** (from the Fine-tune tab) on each watermarked base and
checks for the watermark. Your LoRA was trained on the un-watermarked base; both watermarked bases were
made from that same base, and your LoRA is added to them unchanged.

*A demo shortcut:* the check needs the **owner's secret key**, and this app ships it (`assets/watermark/`)
so that it can play the owner. A real owner keeps the key private; anyone holding it could learn where
the watermark hides and try to remove it.
"""

NO_FINETUNE = (
    "**You have not fine-tuned a LoRA in this session yet.** Train one in the **Fine-tune** tab, then "
    "come back: this tab checks *your* LoRA."
)


def load_watermark(name: str, clean, folder: Path | None = None):
    """(watermarked pipeline, key), or (None, why not): :func:`core.engine.watermarked_base`."""
    return watermarked_base(name, clean, folder)


def verdict_words(watermarked: bool) -> str:
    return "**yes: the watermark is there**" if watermarked else "**no watermark found**"


def aiao_report(engine: Engine, lora: dict, alpha: float) -> str:
    """Markdown: AIAO verification of the LoRA on the watermarked base and, as a control, on the clean base."""
    from core.watermark.aiao import verify_watermark

    pipe, key = load_watermark("AIAO", engine.pipe)
    if pipe is None:
        return key
    on_wm = verify_watermark(pipe, key, lora, alpha=alpha)
    on_clean = verify_watermark(engine.pipe, key, lora, alpha=alpha)
    lines = [
        f"#### AIAO (lazy layers): {verdict_words(on_wm.watermarked)}",
        "",
        f"{len(key.subpaths)} secret subpaths x {on_wm.trials // len(key.subpaths)} random inputs = "
        f"{on_wm.trials} trials. A trial passes when at least {on_wm.rs_threshold:.0%} of its response signs "
        "match the key (a model without this watermark gets there about once in a thousand trials).",
        "",
        "| model | trials passed (VS-rate) | signs right (RS-rate) | p-value | verdict |",
        "|---|---|---|---|---|",
    ]
    for label, v in (("watermarked base + your LoRA", on_wm), ("control: clean base + your LoRA", on_clean)):
        lines.append(
            f"| {label} | {v.vs_rate:.0%} | {v.rs_rate:.0%} | {v.p_value:.2g} | "
            f"{'watermarked' if v.watermarked else 'not watermarked'} |"
        )
    lines += [
        "",
        f"*p-value*: the chance that a model not made from this base matches the key at least this well "
        f"(exact: an unrelated model's signs match a random key like coin flips). The verdict is "
        f'"watermarked" below {on_wm.alpha:g}.',
        "",
        "Evidence, subpath by subpath (trigger layer -> response layer):",
        "",
        "| trigger layer | response layer | signs right | trials passed |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| `{p['trigger']}` | `{p['response']}` | {p['rs']:.0%} | {p['vs']:.0%} |"
        for p in on_wm.per_subpath[:SUBPATH_ROWS]
    ]
    if len(on_wm.per_subpath) > SUBPATH_ROWS:
        lines.append(f"| ... {len(on_wm.per_subpath) - SUBPATH_ROWS} more | | | |")
    return "\n".join(lines)


def backdoor_report(engine: Engine, lora: dict, alpha: float):
    """(markdown, gallery of the trigger-prompt samples) of the baseline backdoor on the LoRA."""
    from core.finetune.lora import pipeline_with_lora
    from core.watermark.backdoor import verify_backdoor

    pipe, key = load_watermark("backdoor", engine.pipe)
    if pipe is None:
        return key, []
    v = verify_backdoor(pipeline_with_lora(pipe, lora, alpha), key)
    md = (
        f"#### Baseline backdoor (trigger prompt): {verdict_words(v.watermarked)}\n\n"
        f"The owner's secret prompt drew {v.trials} images with your LoRA on the backdoored base; "
        f"**{round(v.vs_rate * v.trials)} of {v.trials}** show the checkerboard (correlation with it >= "
        f"{v.threshold:g}; mean {v.mean_correlation:.2f}). p-value {v.p_value:.2g} (estimated from how often the "
        f"clean base passes with the same prompt)."
    )
    return md, [(im, f"correlation {c:.2f}") for im, c in zip(v.images, v.correlations)]


def measured_text(report: dict | None = None, base: str | None = None) -> str:
    """What ``python -m core.studies.watermark`` measured, as a short table (or that it was not run)."""
    from core.studies.watermark import load_report, scenario_table

    r = load_report() if report is None else report
    rows = (r or {}).get("rows") or []
    if not rows:
        return (
            "*The robustness study has not been run yet:* `python -m core.studies.watermark` writes the numbers "
            "quoted here."
        )
    from core.studies import measured_elsewhere

    elsewhere = measured_elsewhere(r, base, "python -m core.studies.watermark --n-clean 20")
    lines = ([elsewhere, ""] if elsewhere else []) + [
        "*Measured by the robustness study* (`python -m core.studies.watermark`"
        + ("" if r.get("complete", True) else "; an incomplete run: what is missing was not measured")
        + "): the share of verification trials that find the watermark (VS-rate), on the watermarked base and "
        "after someone fine-tunes it.",
        "",
    ]
    lines += scenario_table(
        rows,
        lambda x: f"{x['vs_rate']:.0%} ({'found' if x['watermarked'] else 'not found'})",
        first="fine-tune of the watermarked base",
    )
    fps = [
        f"{m}: {f['false_positives']} of {f['models']}"
        for m, f in (r.get("false_positives") or {}).items()
        if f.get("models")
    ]
    if fps:
        lines += [
            "",
            "False alarms on LoRAs of the *un-watermarked* base (the baseline any verdict must beat): "
            + ", ".join(fps)
            + ".",
        ]
    return "\n".join(lines)


def watermark_run(engine: Engine, session):
    """The Check button: yields (AIAO markdown, backdoor markdown, backdoor gallery)."""
    session = ensure(session)
    if session.result is None:
        raise gr.Error("You have not fine-tuned a LoRA in this session yet: train one in the Fine-tune tab first.")
    res = session.result
    yield "Checking the AIAO watermark...", "", []
    aiao = aiao_report(engine, res.lora, res.config.alpha)
    yield aiao, "Checking the backdoor watermark (drawing images with the secret prompt)...", []
    md, gallery = backdoor_report(engine, res.lora, res.config.alpha)
    yield aiao, md, gallery


def status_text(engine: Engine, session) -> str:
    missing = [n for n in WATERMARKS if load_watermark(n, engine.pipe)[0] is None]
    head = (
        NO_FINETUNE
        if session is None or session.result is None
        else (
            f"**Your LoRA** ({session.result.steps_done} steps, rank {session.result.config.rank}) is ready to check."
        )
    )
    return head + ("".join(f"\n\n{load_watermark(n, engine.pipe)[1]}" for n in missing))


def create_watermark_tab(engine: Engine, session: gr.State, tab: gr.Tab | None = None) -> None:
    gr.Markdown(INTRO)
    with gr.Accordion("What the robustness study measured", open=False):
        gr.Markdown(measured_text(base=engine.fingerprint))
    status = gr.Markdown(NO_FINETUNE)
    check = gr.Button("Check my LoRA for both watermarks", variant="primary")
    aiao = gr.Markdown()
    backdoor = gr.Markdown()
    gallery = gr.Gallery(
        label="Backdoor: images drawn with the owner's secret prompt", columns=8, height=160, object_fit="contain"
    )

    def run(s, request: gr.Request):  # the images are files in the visitor's session dir, not in Gradio's cache
        s = ensure(s, request)
        for aiao_md, backdoor_md, images in watermark_run(engine, s):
            yield aiao_md, backdoor_md, media(s, images)

    check.click(
        on_gpu(run, 120),
        [session],
        [aiao, backdoor, gallery],
        api_name="watermark",
        concurrency_limit=1,
        concurrency_id="watermark",
    )
    if tab is not None:
        tab.select(lambda s: status_text(engine, s), [session], [status], api_visibility="private")
