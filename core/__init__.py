"""LoRA Leak Lab engine: plain Python + torch/diffusers/peft, no UI imports.

Every module holds one idea of the two papers the project demonstrates (see README):
data (face folders and the identity split), prompts (vocabulary, class prompt, trigger tokens),
pipeline (the miniature Stable Diffusion: build, load, sample), faces (dlib detection, alignment,
descriptors), ingest (visitor photos -> training-like crops), metrics (identity protocol of
docs/EVAL), events (progress events of long jobs).
"""

import os
from pathlib import Path

# OpenMP threads that wait passively: with the default busy-wait, two torch jobs sharing a 2-core
# machine (a training run beside the app or the tests) ran 12x slower than alone (18 s vs 1.45 s
# per shadow-training step); passive waiting brought it to 2.85 s. Only effective if set before
# torch starts its thread pool, which importing ``core`` first does.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ASSETS = PROJECT_ROOT / "assets"
