"""LoRA Leak Lab engine: plain Python + torch/diffusers/peft, no UI imports.

Every module holds one idea of the two papers the project demonstrates (see README):
data (face folders and the identity split), prompts (vocabulary, class prompt, trigger tokens),
pipeline (the miniature Stable Diffusion: build, load, sample), faces (dlib detection, alignment,
descriptors), ingest (visitor photos -> training-like crops), metrics (identity protocol of
docs/EVAL), events (progress events of long jobs).
"""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ASSETS = PROJECT_ROOT / "assets"
