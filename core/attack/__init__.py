"""The weight-only reconstruction attack (Yao, arXiv 2409.08482) and its baselines.

- ``shadow``: the attacker's own population of LoRAs on public people (K LoRAs per batched forward);
- ``attacker``: the variational network encoder that reads LoRA weights into a prompt embedding;
- ``train``: training the attacker on the shadow population (``python -m core.attack.train``);
- ``baselines``: floor, naive sampling, FineXtract-style extrapolation, the true-trigger ceiling;
- ``report``: every weight-only attack on one LoRA, scored against reference photos;
- ``membership``: was this photo in the LoRA's training set? (LoRA-vs-base loss gap, calibrated threshold).
"""
