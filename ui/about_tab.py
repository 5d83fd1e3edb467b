"""About tab: what the app shows, the threat model, the papers, and the limits, in plain words."""

from __future__ import annotations

import gradio as gr

from core.engine import Engine

ABOUT = """
## What this is
**LoRA Leak Lab** shows what a shared LoRA gives away. A LoRA is a small add-on file that teaches an
image model a new face or object from a few photos. People share them freely, thinking "it's only
weights, not my photos". This lab fine-tunes a LoRA on a few photos and lets an attacker that sees
**only the LoRA file** try to rebuild the person in them.

## Threat model
The attacker knows the public base model and the usual fine-tuning recipe, and has public photos
of *other* people. They do not have your photos, your prompt or your trigger word.

## The papers it reproduces
- D. Yao, *Risks When Sharing LoRA Fine-Tuned Diffusion Model Weights*, arXiv 2409.08482.
- H. Liu et al., *Lazy Layers to Make Fine-Tuned Diffusion Models More Traceable*, arXiv 2405.00466.

## The model in this app
A real Stable Diffusion pipeline in miniature (64 px faces, {size} px here, on `{device}`), trained by the
project from scratch on Labeled Faces in the Wild, on people who are **not** used anywhere else in the
lab. It runs on a laptop CPU; the same code runs Stable Diffusion 1.x on a GPU.

## How identity is measured
With dlib's face-recognition network: two photos whose descriptors are closer than 0.6 are
"the same person" by dlib's rule (93 % right on LFW pairs at 64 px, measured by `python -m core.metrics`).

## Your photos
Nothing you upload is stored beyond your session, logged, or shown to anyone else.
"""


def create_about_tab(engine: Engine) -> None:
    gr.Markdown(ABOUT.format(size=engine.image_size, device=engine.device))
