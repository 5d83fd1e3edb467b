"""Busy and lazy layers (Liu et al., arXiv 2405.00466): which layers a fine-tune moves.

- ``change``: per-layer change of a LoRA or a full fine-tune, rankings, trajectories over the steps;
- ``swap``: keep only the k busiest layers and see how much of the fine-tune remains (the swap curve);
- ``__main__``: ``python -m core.layers PHOTOS...`` (the full fine-tune it compares with lives in
  :mod:`core.finetune.full`).
"""
