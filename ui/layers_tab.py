"""Layers tab: which layers the visitor's fine-tune moved (busy) and which it left alone (lazy).

Only wiring: the measures (``core.layers.change``) and the figures (``core.plots``) live in ``core``. It reads
the LoRA the Fine-tune tab stored in the session (``session.result``, ``session.trained_on``).

During a fine-tune the live job (:func:`core.finetune.live.live_finetune`) yields the per-layer change
of every checkpoint (``LayerChanges``); the Fine-tune tab keeps them in ``session.layer_steps`` (a few
hundred numbers per step, not the weights), and this tab then shows the change over the training
steps instead of the final LoRA alone.
"""

from __future__ import annotations

import gradio as gr
import numpy as np

from core.engine import Engine
from core.faces.metrics import SAME_PERSON
from core.layers.change import (
    DEFAULT_KS,
    KIND_LABELS,
    TAU,
    concentration,
    lora_layer_change,
    rank_layers,
    short_name,
    trajectory_from_changes,
)
from core.layers.swap import iter_swap_curve, resolve_ks
from core.model.prompts import CLASS_PROMPT
from core.plots import layer_heatmap, swap_curve_plot
from ui.gpu import on_gpu
from ui.session import ensure

TOP = 10  # rows of each ranking table

INTRO = """
### Busy and lazy layers
A LoRA adds a small change to many layers of the model. Do they all move alike? Liu et al. (*Lazy Layers
to Make Fine-Tuned Diffusion Models More Traceable*, arXiv 2405.00466) found that a fine-tune moves a few
**busy** layers a lot and leaves many **lazy** ones nearly as they were. Here is the LoRA you trained in
the Fine-tune tab, layer by layer.
"""

NO_FINETUNE = (
    "**You have not fine-tuned a LoRA in this session yet.** Train one in the **Fine-tune** tab, then "
    "come back: this tab measures *your* LoRA, so there is nothing to show before that."
)

SWAP_INTRO = f"""
#### Keep only the busiest layers
Liu et al. copy only the busiest layers of a fine-tuned model into the original one and find it still does
most of the job. Try it on your LoRA: the app keeps its k busiest layers, drops all the others, draws 4
faces with your secret trigger word and measures how close they are to your photos (dlib identity
distance of the faces' mean descriptor to your photos'; lower = closer, below {SAME_PERSON} dlib counts it as the
same person). About 2 seconds per point.
"""


def measured_text(report: dict | None = None, base: str | None = None) -> str:
    """What ``python -m core.studies.layers`` measured over many people, in words (or that it was not run)."""
    from core.studies.layers import headline_k, load_report

    r = load_report() if report is None else report
    s = (r or {}).get("lora")
    if not s or not s.get("n"):
        return "*Not measured over many people yet:* `python -m core.studies.layers` writes the numbers quoted here."
    k, _ = headline_k(s)
    if k is None:
        return ""
    b, lz, rnd = (s[o][k]["kept"] for o in ("busiest", "laziest", "random"))
    from core.studies import measured_elsewhere

    elsewhere = measured_elsewhere(r, base, "python -m core.studies.layers --n 20 --full-n 5")
    return (elsewhere + "\n\n" if elsewhere else "") + (
        f"*Measured on {s['n']} people the models never saw (`python -m core.studies.layers`):* keeping only the "
        f"**{k} busiest** of a LoRA's {s['layers']} layers keeps **{b:.0%}** of what it does to the face (its gain "
        f"over a random face); the {k} laziest keep {lz:.0%}, {k} layers picked at random {rnd:.0%}."
    )


def _fine_tuned(session):
    return session is not None and session.result is not None


def _recorded_trajectory(session, final):
    """The session's recorded steps if they belong to this LoRA (their last step is its final change)."""
    rec = getattr(session, "layer_steps", None) or {}
    if len(rec) < 2 or max(rec) != session.result.steps_done:
        return None
    last = rec[max(rec)]
    if [c.name for c in last] != [c.name for c in final] or not np.allclose(
        [c.relative for c in last], [c.relative for c in final], rtol=1e-4, atol=1e-8
    ):
        return None
    return trajectory_from_changes(rec)


def ranking_table(changes, whose: str = "your LoRA's") -> str:
    """Markdown: the busiest and the laziest layers with what each number measures."""
    n = len(changes)
    top = min(TOP, n)
    busy, lazy = rank_layers(changes, top)
    share = concentration(changes, top)
    head = "| # | layer | block | kind | change ‖ΔW‖ / ‖W‖ | entries moved |\n|---|---|---|---|---|---|"

    def rows(items):
        return "\n".join(
            f"| {i} | `{short_name(c.name)}` | {c.group} | {KIND_LABELS.get(c.kind, c.kind)} | "
            f"**{100 * c.relative:.3g} %** | {100 * c.moved:.0f} % |"
            for i, c in enumerate(items, 1)
        )

    ratio = busy[0].relative / lazy[0].relative if lazy and lazy[0].relative > 0 else float("inf")
    return (
        f"**The {top} busiest of {whose} {n} layers hold {100 * share:.0f} % of its whole change** "
        f"(their share of the total squared change Σ‖ΔW‖²; {100 * top / n:.0f} % of the layers). The busiest "
        f"layer moved {ratio:.1f} times as much as the laziest, relative to its size.\n\n"
        f"*change*: size of the LoRA's change of the layer's weights, as a share of the weights' own size "
        f"(‖ΔW‖ / ‖W‖, Frobenius norms; ΔW = (α/r)·B·A). *entries moved*: share of the layer's weights that "
        f"changed by more than {100 * TAU:g} % of a typical weight of that layer (a LoRA's change is spread "
        f"over every weight, so this is usually high everywhere).\n\n"
        f"**Busiest** (moved most)\n\n{head}\n{rows(busy)}\n\n**Laziest** (moved least)\n\n{head}\n{rows(lazy)}"
    )


def layers_view(engine: Engine, session):
    """(status markdown, heatmap figure or None, ranking markdown) of the session's LoRA."""
    if not _fine_tuned(session):
        return NO_FINETUNE, None, ""
    res = session.result
    changes = lora_layer_change(engine.pipe, res.lora, res.config.alpha)
    if not changes:
        return "Your LoRA has no adapted UNet layers: nothing to show.", None, ""
    traj = _recorded_trajectory(session, changes)
    te = any(k.startswith("text_encoder.") for k in res.lora)
    note = " (its text-encoder adapters are not shown: this tab looks at the UNet)" if te else ""
    if traj is not None:
        fig = layer_heatmap(
            traj.matrix,
            traj.names,
            traj.steps,
            traj.groups,
            title="How much each layer of your LoRA changed over the training steps",
        )
        when = f"one row per recorded step ({', '.join(map(str, traj.steps))})"
    else:
        fig = layer_heatmap(
            np.array([[c.relative] for c in changes]),
            [c.name for c in changes],
            [res.steps_done],
            [c.group for c in changes],
            title=f"How much each layer of your LoRA changed ({res.steps_done} steps)",
        )
        when = f"after all {res.steps_done} training steps"
    status = (
        f"**Your LoRA** ({res.steps_done} steps, rank {res.config.rank}){note}: {len(changes)} layers, {when}. "
        "Each column is one layer, in the order the model uses them: from the noisy image (left) down "
        "through the down blocks, the middle block and back up through the up blocks to the output (right). "
        "The colour is how much your fine-tune changed the layer's weights, relative to their size "
        "(‖ΔW‖ / ‖W‖, log scale); hover a column for the layer's name and the exact value."
    )
    return status, fig, ranking_table(changes)


FILE_INTRO = """
#### Or look at any LoRA file
A LoRA file for this base model (diffusers, peft or kohya / AUTOMATIC1111, LoCon convolution layers included):
its layers, busiest to laziest, read from the weights alone. The swap curve below needs the trigger word, so it
runs on the LoRA you fine-tuned here only.
"""


def file_view(engine: Engine, lora_path, session):
    """(status markdown, heatmap figure or None, ranking markdown) of an uploaded LoRA file (checked as the
    Attack tab checks it; the file is deleted once read, only the per-layer numbers are kept for the page)."""
    from core.finetune.lora_file import LoRAFileError
    from ui.lora_upload import describe_lora, read_lora_upload

    if not lora_path:
        return "Upload a LoRA .safetensors file first.", None, ""
    try:
        lora = read_lora_upload(engine, lora_path, ensure(session), need_unet=False)
    except LoRAFileError as e:
        return f"**This file was refused.** {e}", None, ""
    changes = lora_layer_change(engine.pipe, lora.lora, lora.alpha)
    if not changes:
        return (
            (
                "This LoRA has no adapted UNet layers (only text-encoder ones), and this tab shows UNet layers: "
                "nothing to show here. Upload a LoRA that adapts the UNet (the Fine-tune tab makes one)."
            ),
            None,
            "",
        )
    te = any(k.startswith("text_encoder.") for k in lora.ranks)
    from core.attack.report import recorded_steps

    fig = layer_heatmap(
        np.array([[c.relative] for c in changes]),
        [c.name for c in changes],
        [recorded_steps(lora.meta) or "last"],
        [c.group for c in changes],
        title="How much each layer of the uploaded LoRA changes the model",
    )
    status = (
        f"**The uploaded LoRA**: {describe_lora(lora)}"
        f"{' (its text-encoder layers are not shown: this tab looks at the UNet)' if te else ''}. Each column is "
        "one layer, in the order the model uses them (input on the left, output on the right); the colour is how "
        "much the LoRA changes the layer's weights, relative to their size (‖ΔW‖ / ‖W‖ with each layer's own "
        "alpha and rank, log scale)."
    )
    return status, fig, ranking_table(changes, "the uploaded LoRA's")


def file_checked(engine: Engine, lora_path, session) -> str:
    """The status line the moment a LoRA file arrives: checked (and kept in the session), or refused."""
    from core.finetune.lora_file import LoRAFileError
    from ui.lora_upload import describe_lora, read_lora_upload

    try:
        lora = read_lora_upload(engine, lora_path, session, need_unet=False)
    except LoRAFileError as e:
        return f"**This file was refused.** {e}"
    return f"**LoRA file checked**: {describe_lora(lora)}. Press **Show this file's layers**."


def swap_run(engine: Engine, session, ks=DEFAULT_KS, steps: int = 25):
    """The swap-curve button: yields (status markdown, figure) as each k is measured (``steps``:
    sampler steps of the scored images, the identity protocol's 25)."""
    if not _fine_tuned(session):
        raise gr.Error("You have not fine-tuned a LoRA in this session yet: train one in the Fine-tune tab first.")
    res = session.result
    photos = list(session.trained_on)
    if not photos:
        raise gr.Error("The photos of your fine-tune are no longer in this session: fine-tune again.")
    changes = lora_layer_change(engine.pipe, res.lora, res.config.alpha)
    todo = resolve_ks(ks, len(changes))
    yield f"Measuring {len(todo)} points (k = {', '.join(map(str, todo))})...", None
    rows = []
    for row in iter_swap_curve(
        engine.pipe,
        res.lora,
        res.trigger,
        photos,
        todo,
        res.config.alpha,
        changes=changes,
        steps=steps,
        floor=engine.floor_images(),
    ):
        rows.append(row)
        yield _swap_status(rows, len(todo)), swap_curve_plot(rows)


def _swap_status(rows, total: int) -> str:
    last = rows[-1]
    lines = [
        f"**{len(rows)} of {total} points measured.** dlib distance to your photos of 4 faces drawn with your "
        f"trigger word (lower = closer), keeping only the k busiest of {last.n_layers} layers:",
        "",
        "| busiest layers kept | distance |",
        "|---|---|",
    ]
    lines += [f"| {r.k}{' (all: your whole LoRA)' if r.k == r.n_layers else ''} | **{r.distance:.2f}** |" for r in rows]
    lines.append(f'| floor: a random face from the base model ("{CLASS_PROMPT}") | {last.floor:.2f} |')
    lines += [
        "",
        "A point near the *all* value means those few layers carry most of what your LoRA learned; a point "
        "near the floor means they are not enough. Compare with the floor rather than with "
        f"{SAME_PERSON}: averaging descriptors pulls any set toward the average face.",
    ]
    return "\n".join(lines)


def create_layers_tab(engine: Engine, session: gr.State, tab: gr.Tab | None = None) -> None:
    gr.Markdown(INTRO)
    status = gr.Markdown(NO_FINETUNE)
    heatmap = gr.Plot(label="Change of every layer")
    table = gr.Markdown()
    gr.Markdown(FILE_INTRO)
    with gr.Row():
        lora_file = gr.File(label="A LoRA file (.safetensors) for this app's base model", type="filepath", scale=2)
        file_btn = gr.Button("Show this file's layers", scale=1)
    gr.Markdown(SWAP_INTRO + "\n" + measured_text(base=engine.fingerprint))
    swap_btn = gr.Button(
        f"Measure what survives (k = {', '.join('all' if k is None else str(k) for k in DEFAULT_KS)})",
        variant="primary",
    )
    swap_status = gr.Markdown()
    swap_plot = gr.Plot(label="What survives with only the busiest layers")

    def swap(s):
        yield from swap_run(engine, s)

    def from_file(f, s, request: gr.Request):
        s = ensure(s, request)  # only this visitor's own uploads are read
        return (*file_view(engine, f, s), s)

    # an upload is read the moment it arrives (an upload left unread is deleted within a minute,
    # ui.uploads); the button then finds what came of it in the session
    def arrived(f, s, request: gr.Request):
        s = ensure(s, request)
        return (file_checked(engine, f, s) if f else gr.skip()), s

    lora_file.upload(arrived, [lora_file, session], [status, session], api_visibility="private")

    file_btn.click(
        on_gpu(from_file, 60),
        [lora_file, session],
        [status, heatmap, table, session],
        api_name="layers_file",
        concurrency_limit=2,
        concurrency_id="layers_file",
    )
    swap_btn.click(
        on_gpu(swap, 300),
        [session],
        [swap_status, swap_plot],
        api_name="swap_curve",
        concurrency_limit=1,
        concurrency_id="swap",
    )
    if tab is not None:  # refreshed each time the visitor opens the tab
        tab.select(lambda s: layers_view(engine, s), [session], [status, heatmap, table], api_visibility="private")
