"""The watermarked bases the app ships (``assets/watermark``), by name, and how each is rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

from core.watermark.aiao import WatermarkKey, verify_watermark
from core.watermark.backdoor import BackdoorKey, verify_backdoor
from core.watermark.formats import RECORD_FILE, SHIPPED, WATERMARK_DIR, KeyFileError, load_delta

KEYS = {"AIAO": WatermarkKey, "backdoor": BackdoorKey}
VERIFY = {"AIAO": verify_watermark, "backdoor": verify_backdoor}
COMMANDS = {"AIAO": "embed-aiao", "backdoor": "embed-backdoor"}  # sub-commands of python -m core.watermark


def shipped_watermark(name: str, clean, folder: str | Path | None = None):
    """(watermarked pipeline, key) of a watermarked base shipped as a delta over ``clean`` (the embedded
    base) in ``folder`` (default ``assets/watermark``). Raises :class:`KeyFileError` (with the command
    that builds it) when it is missing or does not fit."""
    folder = Path(folder or WATERMARK_DIR)
    delta, key_file = (folder / f for f in SHIPPED[name])
    if not delta.exists() or not key_file.exists():
        raise KeyFileError(
            f"the {name}-watermarked base is not built ({delta.name} and {key_file.name} missing in "
            f"{folder}); build it with: {embed_command(name)}"
        )
    return load_delta(clean, delta), KEYS[name].load(key_file)


def embed_command(name: str) -> str:
    """The command that builds a shipped watermark (as recorded in ``assets/watermark/watermark.json``
    when it exists, else the default one)."""
    try:
        return json.loads((WATERMARK_DIR / RECORD_FILE).read_text())[name]["command"]
    except (OSError, KeyError, ValueError, TypeError):
        return f"python -m core.watermark {COMMANDS[name]}"
