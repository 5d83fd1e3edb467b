"""LoRA Leak Lab: ``python app.py`` starts the Gradio app on the embedded miniature model.

Options (``python app.py --help``): ``--model`` (a folder or a Stable Diffusion 1.x hub id),
``--device``, ``--attacker``, ``--max-batch`` / ``--gather-seconds`` (the training hub: how many
visitors train together), ``--port``, ``--host``, ``--share``. Environment: ``LEAKLAB_MODEL`` sets
the model too.
"""

from __future__ import annotations

import os
import sys


def uses_embedded_model(argv=None, env=None) -> bool:
    """True when neither ``--model`` nor ``LEAKLAB_MODEL`` names a model: the embedded default."""
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ if env is None else env
    return not env.get("LEAKLAB_MODEL") and not any(a == "--model" or a.startswith("--model=") for a in argv)


if uses_embedded_model():
    # The embedded model ships in the repo and never needs the hub: offline before huggingface_hub
    # is imported (it reads the variable once, at import).
    os.environ["HF_HUB_OFFLINE"] = "1"

# On a ZeroGPU Space, ``spaces`` must be imported before torch touches CUDA: ui.gpu imports it first
# thing (and imports no torch itself), before any module below imports torch.
from ui import gpu  # noqa: E402,I001  (first on purpose)

from dataclasses import dataclass, field  # noqa: E402

from core.cli import Switch  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402

import gradio as gr  # noqa: E402

from core.engine import Engine  # noqa: E402
from core.faces.ingest import MAX_BYTES as MAX_PHOTO_BYTES  # noqa: E402
from core.finetune.lora_file import MAX_BYTES as MAX_LORA_BYTES  # noqa: E402
from ui import session as sessions  # noqa: E402
from ui import uploads  # noqa: E402
from ui.about_tab import create_about_tab  # noqa: E402
from ui.attack_tab import create_attack_tab  # noqa: E402
from ui.defenses_tab import create_defenses_tab  # noqa: E402
from ui.finetune_tab import create_finetune_tab  # noqa: E402
from ui.layers_tab import create_layers_tab  # noqa: E402
from ui.pending_tabs import PENDING, create_pending_tab  # noqa: E402
from ui.watermark_tab import create_watermark_tab  # noqa: E402

TITLE = "LoRA Leak Lab"
INTRO = (
    "**What does a shared LoRA give away?** Fine-tune a LoRA on a few photos, then watch an "
    "attacker who sees only the LoRA's weights try to rebuild them."
)
MAX_FILE_SIZE = max(MAX_LORA_BYTES, MAX_PHOTO_BYTES)  # the largest legitimate upload: a LoRA file


def launch_options() -> dict:
    """What every launch of the app gets (``python app.py``, a Space, the tests), unless a caller
    says otherwise:

    - ``run_history=False``: Gradio would otherwise save every call (the secret trigger word, file
      names, session and upload paths) in the browser's storage and list it at ``/gradio_api/runs``,
      where the next person at a shared classroom computer finds it;
    - ``enable_monitoring=False``: ``/monitoring`` and its summary are not public;
    - ``max_file_size``: the largest legitimate input (a 64 MB LoRA file); Gradio refuses bigger
      uploads while they stream in and deletes their bytes at once;
    - the :class:`ui.uploads.PrivateUploads` middleware (each upload gets a private path of its own;
      session files are served with ``Cache-Control: no-store``).
    """
    from starlette.middleware import Middleware

    private = Middleware(uploads.PrivateUploads, private=lambda: (sessions.SESSION_ROOT, uploads.upload_root()))
    return dict(
        run_history=False, enable_monitoring=False, max_file_size=MAX_FILE_SIZE, app_kwargs={"middleware": [private]}
    )


class LabBlocks(gr.Blocks):
    """``gr.Blocks`` that launches with :func:`launch_options` and keeps the session root clean: it is
    emptied at start-up and at shutdown, and swept in between (:class:`ui.session.Sweeper`)."""

    _sweeper: sessions.Sweeper | None = None

    def launch(self, *args, **kwargs):
        opts = launch_options()
        app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
        app_kwargs["middleware"] = [*opts.pop("app_kwargs")["middleware"], *app_kwargs.get("middleware", [])]
        sessions.empty_root()
        self._sweeper = sessions.Sweeper().start()
        return super().launch(*args, **{**opts, **kwargs, "app_kwargs": app_kwargs})

    def close(self, verbose: bool = True) -> None:
        super().close(verbose)
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None
            sessions.empty_root()


def build_demo(engine: Engine) -> gr.Blocks:
    # a visitor's images and LoRA are served from their session dir (ui.session), never copied to Gradio's cache
    sessions.SESSION_ROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
    gr.set_static_paths([sessions.SESSION_ROOT])
    # delete_cache: Gradio's own cache (no visitor file: those live in session dirs and leaklab-uploads)
    with LabBlocks(title=TITLE, delete_cache=(3600, 3600)) as demo:
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
        # the browser session ended: delete its photos, crops and LoRAs now (Gradio's documented idiom)
        demo.unload(sessions.end_session)
    demo.queue(default_concurrency_limit=2, max_size=64)
    return demo


def _terminate(signum, frame):  # SIGTERM (a Space stopping, a container shut down): leave through `finally`
    raise SystemExit(0)


def from_env(name: str, default=None, kind=str):
    """A field whose default is environment variable ``name`` (read when the arguments are built), else ``default``."""
    return field(default_factory=lambda: kind(os.environ[name]) if name in os.environ else default)


@dataclass
class AppArgs:
    """Start LoRA Leak Lab (the embedded miniature model unless --model names another)."""

    model: str | None = from_env("LEAKLAB_MODEL")  # model folder or SD 1.x hub id (default: $LEAKLAB_MODEL or embedded)
    device: str | None = None  # torch device (default: cuda on a ZeroGPU Space or where a GPU is seen, else cpu)
    attacker: str | None = None  # weight-only attacker's .safetensors (default: assets/attacker/attacker.safetensors)
    max_batch: int = 0  # most visitors fine-tuned in one batched job (0: by hardware, 8 on CPU, 32 on GPU; 1: alone)
    gather_seconds: float = 0.0  # an idle training hub waits this long for more visitors before it starts (0: at once)
    port: int = from_env("GRADIO_SERVER_PORT", 7860, int)  # port to serve on (env GRADIO_SERVER_PORT)
    host: str = from_env("GRADIO_SERVER_NAME", "127.0.0.1")  # interface to serve on (env GRADIO_SERVER_NAME)
    share: Switch = False  # also open a temporary public gradio.live link
    compile: Switch = True  # compile the fine-tune step once at start-up, in the background (bench/compile_once.py)


def main(argv=None):
    from core.cli import parse
    from core.finetune.hub import HubConfig

    a = parse(AppArgs, argv)
    signal.signal(signal.SIGTERM, _terminate)
    engine = Engine(
        a.model,
        gpu.startup_device(a.device),
        attacker=a.attacker,
        hub_config=HubConfig(max_batch=a.max_batch, gather_seconds=a.gather_seconds, compile=a.compile),
    )
    starter = None
    if a.compile:  # start the training hub now: it compiles while the app serves
        starter = threading.Thread(target=engine.hub, name="hub-start", daemon=True)
        starter.start()
    demo = build_demo(engine)
    try:
        demo.launch(server_name=a.host, server_port=a.port, share=a.share)
    finally:
        demo.close()
        sessions.empty_root()
        if engine.compiling() or (starter is not None and starter.is_alive()):
            # torch.compile cannot be interrupted, and ending the interpreter under it aborts the
            # process (C++ "terminate called"): the visit's files are gone now, so leave at once
            print("leaving during the start-up compile", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(0)


if __name__ == "__main__":
    main()
