"""Tabs whose engine is not built yet: each says plainly what it will do, and shows nothing fake."""

from __future__ import annotations

import gradio as gr

PENDING = {
    "Watermark": (
        "The model owner's view: an ownership watermark hidden in *lazy* layers (AIAO) survives your "
        "fine-tune, while a classic trigger-image watermark fades. Verify a freshly trained LoRA and "
        "see the verdict with its evidence."
    ),
}


def create_pending_tab(name: str) -> None:
    gr.Markdown(f"### {name}: *not built yet*\n{PENDING[name]}")
