"""Defenses tab: what each defense of a shared LoRA costs, from the privacy-utility study; and what
protecting the photos themselves (cloaking) does, from the cloaking study, with a try-it button.

Only wiring: the studies are ``core.studies.defenses`` and ``core.studies.cloaking`` (run offline), their
charts ``core.plots.privacy_utility_plot`` and ``core.plots.cloaking_plot``. This tab reads
``docs/results/defenses.json`` and ``docs/results/cloaking.json`` and shows them; without a file it says
that study has not been run and shows nothing else for it. The try-it section (``ui.protect_panel``)
cloaks the photos of the visitor's session.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from core import RESULTS
from core.plots import cloaking_plot, privacy_utility_plot
from core.studies import measured_elsewhere
from core.studies.defenses import DP_NOISE, table_markdown

RESULTS_JSON = RESULTS / "defenses.json"
CLOAKING_JSON = RESULTS / "cloaking.json"
COMMAND = "python -m core.studies.defenses"
CLOAKING_COMMAND = "python -m core.studies.cloaking"

INTRO = """
### Defenses: what they cost
You can protect a LoRA before sharing it, but every protection also blurs what the LoRA learned. This tab
shows both sides for each defense, measured on real people the attacker never saw: how far the attacker's
reconstruction is from their photos (privacy), and how far the LoRA's own drawings with its secret trigger
are from them (utility). Try them on your own photos in the **Fine-tune** tab, under *Defenses*.
"""

EXPLAIN = f"""
#### The defenses
- **Weight noise**: random Gaussian noise added to every number of the LoRA file; strength = the noise's size
  relative to the typical size of the weights (1 = as large as the weights themselves).
- **Pruning**: the smallest weights of each LoRA tensor are set to zero; strength = the share set to zero.
- **Quantization**: each weight is rounded to one of a few levels; strength = bits per weight (fewer = coarser).
- **Rank truncation**: each layer's change is cut down to its strongest few directions (singular vectors);
  strength = how many directions are kept (the LoRA's rank r keeps everything).
- **DP-SGD** (differential privacy while training): each photo's influence on every training step is clipped
  and hidden under random noise; strength = the noise multiplier σ, and the privacy accountant turns it into
  **epsilon** (smaller = stronger promise). Epsilon is **per photo**: it bounds what the LoRA reveals about
  whether any *one* photo was used, not about the person; someone with 5 photos in the set has roughly 5x that
  epsilon. The study retrains every LoRA from scratch for each σ (by default {", ".join(f"{s:g}" for s in DP_NOISE)}).

#### Reading the chart
Each point is one defense at one strength, averaged over the study's people. **Across** (x): the dlib identity
distance of the LoRA's own samples with its trigger to the person's photos: lower means the LoRA still draws the
person (utility). **Up** (y): the distance of the attacker's reconstruction to the same photos: higher means the
attacker learned less (privacy). Each line starts at the **undefended LoRA** (the star) and gets stronger point by
point. The **floor** (the grey cross and dotted lines) is a random face from the base model: an attack at the floor
does no better than guessing a random face, and a LoRA at the floor no longer draws the person. The best place is
the top left: attack at the floor, LoRA still useful. *Top-1* in the table is how often the attacker's image is
closer to its victim than to any of the other people in the study.
"""

NOT_RUN = (
    f"**The privacy-utility study has not been run yet**, so there are no measurements to show here. "
    f"It needs the trained attacker (`assets/attacker/attacker.safetensors`); then run\n\n"
    f"```bash\n{COMMAND}\n```\n\n"
    f"which writes `docs/results/defenses.json` (read by this tab), `defenses.md` and the chart "
    f"(`--n`, `--defenses`, `--skip-dp`, `--out`: see `{COMMAND} --help`)."
)


def load_study(path: str | Path = RESULTS_JSON) -> dict | None:
    """The study's results, or None when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def defenses_view(path: str | Path = RESULTS_JSON, base: str | None = None):
    """(status markdown, chart or None, table and conclusion markdown) of the study at ``path`` (``base``:
    the running model's fingerprint, to say so when the study measured another model)."""
    try:
        r = load_study(path)
    except (OSError, ValueError) as e:
        return f"**The study's results at `{path}` could not be read** ({e}). Run `{COMMAND}` again.", None, ""
    if r is None:
        return NOT_RUN, None, ""
    dp = [x for x in r["rows"] if x["defense"] == "dp_sgd"]
    head = (
        f"**Measured on {r['n']} people** (victims never seen by the base model or the attacker; chance "
        f"top-1: {r['chance_top1']:.0%}). Produced by `{r.get('command', COMMAND)}` on {r.get('created', '?')} "
        f"(base model `{r.get('base', '?')}`, attacker `{r.get('attacker', '?')}`"
        f"{', with ' + str(len(dp)) + ' DP-SGD settings' if dp else ', without DP-SGD'})."
    )
    elsewhere = measured_elsewhere(r, base, COMMAND)
    head = f"{elsewhere}\n\n{head}" if elsewhere else head
    table = f"{table_markdown(r)}\n\n**What the numbers say** (generated from them): {r.get('conclusion', '')}"
    return head, privacy_utility_plot(r["rows"]), table


CLOAKING_INTRO = """
### Before sharing anything: protect the photos themselves
The defenses above act on the LoRA, so they need the person who fine-tunes to care. What can *you* do before
your photos are online? **Cloaking** (as in Anti-DreamBooth, Mist, PhotoGuard) adds a faint pattern to each
photo, computed to make a fine-tune on them fail; **purification** (JPEG re-compression, a little noise,
resizing down and up) is what a determined attacker, or an upload pipeline, does to photos anyway, and research
found it often washes cloaks out. The study below trains the same LoRA recipe on each person's clean, cloaked
and cloaked-then-purified photos and measures how well each LoRA (and the attacker) still gets the person.
"""

CLOAKING_NOT_RUN = (
    f"**The cloaking study has not been run yet**, so there are no measurements to show here. Run\n\n"
    f"```bash\n{CLOAKING_COMMAND}\n```\n\nwhich writes `docs/results/cloaking.json` (read by this tab), "
    f"`cloaking.md` and the chart (`--n`, `--budgets`, `--attack`: see `{CLOAKING_COMMAND} --help`)."
)


def cloaking_view(path: str | Path = CLOAKING_JSON, base: str | None = None):
    """(status markdown, chart or None, table and conclusion markdown) of the cloaking study at ``path``."""
    from core.studies.cloaking import table_markdown as cloaking_table

    try:
        r = load_study(path)
    except (OSError, ValueError) as e:
        return (
            f"**The cloaking study's results at `{path}` could not be read** ({e}). Run `{CLOAKING_COMMAND}` again.",
            None,
            "",
        )
    if r is None:
        return CLOAKING_NOT_RUN, None, ""
    head = (
        f"**Measured on {r['n']} people** (victims never seen by the base model or the attacker; chance top-1 "
        f"{r['chance_top1']:.0%}). Produced by `{r.get('command', CLOAKING_COMMAND)}` on {r.get('created', '?')} (base "
        f"model `{r.get('base', '?')}`; attacker: {r.get('attacker', '?')}). Distances are dlib identity distances to "
        "the person's *clean* photos: higher = the LoRA (or the attacker) got the person less well."
    )
    elsewhere = measured_elsewhere(r, base, CLOAKING_COMMAND)
    head = f"{elsewhere}\n\n{head}" if elsewhere else head
    table = f"{cloaking_table(r)}\n\n**What the numbers say** (generated from them): {r.get('conclusion', '')}"
    return head, cloaking_plot(r), table


def create_defenses_tab(
    tab: gr.Tab | None = None,
    path: str | Path = RESULTS_JSON,
    engine=None,
    session: gr.State | None = None,
    cloaking_path: str | Path = CLOAKING_JSON,
) -> None:
    """The tab; with ``engine`` and ``session`` also the "Cloak my photos" try-it section."""
    gr.Markdown(INTRO)
    base = engine.fingerprint if engine is not None else None
    head, fig, table_md = defenses_view(path, base)
    status = gr.Markdown(head)
    chart = gr.Plot(value=fig, label="Privacy against utility")
    table = gr.Markdown(table_md)
    gr.Markdown(EXPLAIN)
    gr.Markdown(CLOAKING_INTRO)
    c_head, c_fig, c_table = cloaking_view(cloaking_path, base)
    c_status = gr.Markdown(c_head)
    c_chart = gr.Plot(value=c_fig, label="Cloaked photos against a LoRA fine-tune")
    c_table_md = gr.Markdown(c_table)
    if engine is not None and session is not None:
        from ui.protect_panel import create_cloak_preview

        create_cloak_preview(engine, session)
    if tab is not None:  # re-read each time the tab is opened (the studies may have finished meanwhile)
        tab.select(
            lambda: (*defenses_view(path, base), *cloaking_view(cloaking_path, base)),
            None,
            [status, chart, table, c_status, c_chart, c_table_md],
            api_visibility="private",
        )
