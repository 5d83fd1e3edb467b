"""Defenses a LoRA's owner can apply, and what each costs.

- ``posthoc``: weight noise, pruning, quantization, rank truncation of a finished LoRA;
- ``dp``: the DP-SGD fine-tune (per-photo clipping and noise; epsilon from Opacus' accountant).
"""
