"""The typed error of a refused LoRA file, shared by its validation (:mod:`core.finetune.lora_file`)
and its format readers (:mod:`core.finetune.formats`)."""

from __future__ import annotations


class LoRAFileError(ValueError):
    """A refused LoRA file: ``str(err)`` is a sentence for the visitor, ``reason`` a short code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def show(text: str, limit: int = 80) -> str:
    """An untrusted string made safe to quote in a message: printable, quoted, truncated."""
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
