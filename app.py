"""LoRA Leak Lab: ``python app.py`` starts the Gradio app on the embedded miniature model.

Options: ``--model`` (a folder or a Stable Diffusion 1.x hub id), ``--device``, ``--port``,
``--share``. Environment: ``LEAKLAB_MODEL`` sets the model too.
"""

from __future__ import annotations

import argparse
import os

import gradio as gr

from core.engine import Engine
from ui.about_tab import create_about_tab
from ui.attack_tab import create_attack_tab
from ui.defenses_tab import create_defenses_tab
from ui.finetune_tab import create_finetune_tab
from ui.layers_tab import create_layers_tab
from ui.pending_tabs import PENDING, create_pending_tab
from ui.watermark_tab import create_watermark_tab
from ui.session import SESSION_ROOT, end_session

TITLE = "LoRA Leak Lab"
INTRO = ("**What does a shared LoRA give away?** Fine-tune a LoRA on a few photos, then watch an "
         "attacker who sees only the LoRA's weights try to rebuild them.")


def build_demo(engine: Engine) -> gr.Blocks:
    # a visitor's images and LoRA are served from their session dir (ui.session), never copied to Gradio's cache
    SESSION_ROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
    gr.set_static_paths([SESSION_ROOT])
    # delete_cache: Gradio's own copies of uploads (deleted once read) are removed hourly, at most an hour old
    with gr.Blocks(title=TITLE, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Tab("Fine-tune"):
            session = create_finetune_tab(engine)
        with gr.Tab("Attack") as attack:
            create_attack_tab(engine, session, attack)
        with gr.Tab("Layers") as layers:
            create_layers_tab(engine, session, layers)
        with gr.Tab("Defenses") as defenses:
            create_defenses_tab(defenses, engine=engine, session=session)
        with gr.Tab("Watermark") as watermark:
            create_watermark_tab(engine, session, watermark)
        for name in PENDING:
            with gr.Tab(name):
                create_pending_tab(name)
        with gr.Tab("About"):
            create_about_tab(engine)

        def unload(request: gr.Request):  # the browser session ended: delete its photos, crops and LoRAs now
            end_session(demo, request)

        demo.unload(unload)
    demo.queue(default_concurrency_limit=2, max_size=64)
    return demo


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.environ.get("LEAKLAB_MODEL"), help="model folder or hub id (default: embedded)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--share", action="store_true")
    a = ap.parse_args(argv)
    demo = build_demo(Engine(a.model, a.device))
    demo.launch(server_name=a.host, server_port=a.port, share=a.share)


if __name__ == "__main__":
    main()
