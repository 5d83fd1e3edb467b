"""LoRA Leak Lab engine: plain Python + torch/diffusers/peft, no UI imports.

Every module holds one idea of the two papers the project demonstrates (see README):
data (face folders and the identity split), prompts (vocabulary, class prompt, trigger tokens),
pipeline (the miniature Stable Diffusion: build, load, sample), faces (dlib detection, alignment,
descriptors), ingest (visitor photos -> training-like crops), metrics (identity protocol of
docs/EVAL), events (progress events of long jobs).
"""

import json
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ASSETS = PROJECT_ROOT / "assets"
RESULTS = PROJECT_ROOT / "docs" / "results"  # what the evaluation commands measured (json + md)


def load_report(name: str, path=None) -> dict | None:
    """An evaluation's last results (``docs/results/<name>.json``, or ``path``), or None where none was
    run or the file cannot be read."""
    try:
        return json.loads(Path(path or RESULTS / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
