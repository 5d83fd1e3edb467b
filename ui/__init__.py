"""Gradio UI of LoRA Leak Lab: one module per tab, each exporting ``create_*_tab(engine)``.
Only widgets and wiring live here; all work is done by :mod:`core`."""
