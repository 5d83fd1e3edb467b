"""Tabs whose engine is not built yet: each says plainly what it will do, and shows nothing fake."""

from __future__ import annotations

import gradio as gr

PENDING: dict[str, str] = {}  # tab name -> what it will do (none pending now)


def create_pending_tab(name: str) -> None:
    gr.Markdown(f"### {name}: *not built yet*\n{PENDING[name]}")
