"""Measured studies: each ``python -m core.studies.<name>`` writes ``docs/results/<name>.{json,md}``.

- ``base``: quality of a base model (face detection, Frechet distance, prompt sensitivity);
- ``finetune``: does the default LoRA draw its person (utility over victims);
- ``attack``: the attacker against its baselines over victims;
- ``layers``: busiest vs laziest vs random layers over victims;
- ``watermark``: robustness of AIAO and the backdoor to downstream fine-tunes;
- ``defenses``: the privacy-utility curve of every defense;
- ``cloaking``: clean vs cloaked vs cloaked-then-purified photos, against the LoRA and the attack;
- ``membership``: ROC AUC of membership inference on victims, and the app's calibrated threshold.
"""
