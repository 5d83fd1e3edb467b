"""LoRA Leak Lab engine: plain Python + torch/diffusers/peft, no UI imports; every function is usable
from a script, and every long job is a generator of :mod:`core.events`.

One package per idea of the two papers (each package's docstring lists its modules):

- ``model``: the diffusion model (the embedded miniature Stable Diffusion, its autoencoder, the one
  denoising step every trainer shares, sampling, the base model's recipe);
- ``faces``: face data, dlib recognition, visitor photos -> aligned crops, the identity protocol;
- ``finetune``: what a victim does (the DreamBooth LoRA fine-tune, the live job, the training hub
  that batches visitors, the LoRA files people share);
- ``attack``: the weight-only reconstruction attack (Yao) with its shadow LoRAs and baselines, and
  membership inference;
- ``layers``: busy and lazy layers (Liu et al.);
- ``watermark``: ownership watermarks in lazy layers (AIAO) and the backdoor baseline;
- ``defenses``: post-hoc defenses, DP-SGD, photo cloaking and purification;
- ``studies``: the measured studies behind every number (``docs/results``).

Plumbing beside them: ``events`` (the job protocol), ``cli`` (flags from config dataclasses),
``cache`` and ``checkpoint`` (resumable work), ``engine`` (what the app shares between visitors),
``plots`` (plotly figures), ``rebuild`` (every asset and study downstream of the base model, in
order, resumable).
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
