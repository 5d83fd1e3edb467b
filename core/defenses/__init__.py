"""Defenses, and what each costs: on the LoRA's owner's side, and on the photos before they are online.

- ``posthoc``: weight noise, pruning, quantization, rank truncation of a finished LoRA;
- ``dp``: the DP-SGD fine-tune (per-photo clipping and noise; epsilon from Opacus' accountant);
- ``cloak``: an adversarial cloak on the photos themselves (Anti-DreamBooth-style PGD on the
  fine-tune's loss, within an L-infinity budget), with its visible cost (PSNR, SSIM);
- ``purify``: what an attacker (or an upload pipeline) does to photos first: noise, resizing, JPEG, blur.
"""
