"""Ownership watermarks of the base model.

- ``aiao``: AIAO, a feature-space backdoor along subpaths of lazy layers (Liu et al.), embedding
  and verification;
- ``backdoor``: the baseline, a trigger prompt that makes the model draw a fixed pattern.
"""
