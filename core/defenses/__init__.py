"""Defenses a LoRA's owner can apply, and what each costs.

- ``posthoc``: weight noise, pruning, quantization, rank truncation of a finished LoRA, and the
  DP-SGD fine-tune (epsilon from Opacus' accountant).
"""
