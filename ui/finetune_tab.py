"""Fine-tune tab. Built so far: sampling the base model (the starting point of every fine-tune)."""

from __future__ import annotations

import gradio as gr

from core.engine import Engine, SampleRequest
from core.prompts import CLASS_PROMPT

PLANNED = """
### Fine-tune a LoRA on your photos: *not built yet*
Coming next: upload 3-10 photos of one face (or pick the bundled examples, faces drawn by the base
model itself), see the aligned crops, press **Train**, and watch the loss curve and the LoRA's own
samples update live; then download the LoRA. The trigger word that calls your face up is shown to
you and is **not** stored in the file you share.
"""


def create_finetune_tab(engine: Engine) -> None:
    gr.Markdown(PLANNED)
    gr.Markdown(
        f"### The base model, before any fine-tune\n"
        f"Every fine-tune starts from this model (`{engine.model_name}`, {engine.image_size} px, on "
        f"`{engine.device}`). These faces are drawn from the prompt **\"{CLASS_PROMPT}\"**: they are "
        f"no one in particular. A fine-tune teaches it one person; the attacker later tries to get that "
        f"person back from the fine-tune's weights alone."
    )
    with gr.Row():
        with gr.Column(scale=1, min_width=220):
            seed = gr.Number(value=0, precision=0, label="Seed", info="same seed, same faces")
            n = gr.Slider(1, 16, value=8, step=1, label="How many faces")
            with gr.Accordion("Advanced", open=False):
                steps = gr.Slider(5, 50, value=25, step=1, label="Denoising steps")
                guidance = gr.Slider(1.0, 8.0, value=1.0, step=0.5, label="Guidance scale",
                                     info="1 = plain sampling; higher follows the prompt harder")
            go = gr.Button("Draw faces", variant="primary")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Samples of the base model", columns=8, height="auto", object_fit="contain")

    def run(seed, n, steps, guidance):
        try:
            req = SampleRequest(CLASS_PROMPT, int(n), int(seed), int(steps), float(guidance))
        except ValueError as e:
            raise gr.Error(str(e))
        return engine.sample(req)

    go.click(run, [seed, n, steps, guidance], gallery, api_name="sample", concurrency_limit=2)
