"""Ownership watermarks of the base model.

- ``aiao``: AIAO, a feature-space backdoor along subpaths of lazy layers (Liu et al.), embedding
  and verification;
- ``backdoor``: the baseline, a trigger prompt that makes the model draw a fixed pattern;
- ``formats``: what both share: key documents, a watermarked base stored as a delta, records;
- ``owner``: the owner's own data (training latents, the lazy-layer probe photos);
- ``shipped``: the watermarked bases the app ships, by name, and how each is rebuilt;
- ``__main__``: ``python -m core.watermark {embed,verify}-{aiao,backdoor}``.
"""
