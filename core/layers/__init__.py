"""Busy and lazy layers (Liu et al., arXiv 2405.00466): which layers a fine-tune moves.

- ``change``: per-layer change of a LoRA or a full fine-tune, rankings, trajectories, and the swap
  curve (copy only the k busiest layers into the base and see how much of the fine-tune remains).
"""
