"""About tab: what the app shows, the threat model, the papers, and the limits, in plain words."""

from __future__ import annotations

import gradio as gr

from core.engine import Engine
from ui.session import SESSION_TTL

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
A real Stable Diffusion pipeline in miniature ({size} px faces, on `{device}`), trained by the project
on about 27,000 face photos: UTKFace (ages 0 to 116, women and men, five ethnic groups) and Labeled
Faces in the Wild, every photo cropped the way your uploads are, none of a person used anywhere else
in the lab. Its autoencoder is a pretrained tiny one (TAEF2, MIT licence). It runs on a laptop CPU;
the same code runs Stable Diffusion 1.x on a GPU.

## The tabs
- **Fine-tune**: your photos become a LoRA; beside it, live, the attacker's picture of you from the
  LoRA's weights at each checkpoint. Defense switches (DP-SGD, noise, pruning, quantization) are under
  "Defenses" there.
- **Attack**: attack any LoRA file made for this app's base model, or the one you just trained.
- **Layers**: which layers of the model your fine-tune moved ("busy") and which it left alone ("lazy").
- **Defenses**: the measured price of each defense: how much it hides you against how much it breaks the LoRA.
- **Watermark**: the model owner's view: a watermark hidden in lazy layers, checked on your LoRA.

## A room of visitors
Up to **{batch}** visitors fine-tune at the same time on this machine (`{device}`), in one batched job
(`--max-batch`): each keeps their own photos, trigger word, settings, live attack and LoRA, and a
visitor who stops or leaves does not disturb the others. Whoever comes next waits in a queue and
sees their place and an estimate.{compiled} DP-SGD and text-encoder fine-tunes train one at a time, and the
Fine-tune tab says so.

## How identity is measured
With dlib's face-recognition network: two photos whose descriptors are closer than 0.6 are
"the same person" by dlib's rule (94 % right on LFW pairs at 128 px, measured by
`python -m core.faces.metrics`).
Every score in the app is shown next to a **baseline**: the same score for a random face drawn by
the base model (the "floor"), and where it exists, for the LoRA used with its secret trigger word
(the "ceiling": what the LoRA's owner gets). Averaging several faces pulls any set toward the
average face, so compare with the floor, not with 0.6.

## Limits, plainly
- The model here is tiny ({size} px faces, trained for a few hours on a 2-core CPU). A face it
  draws is a rough likeness, not a photo; attacks on real Stable Diffusion LoRAs work at far higher resolution.
- The attacker is trained on LoRAs made with **this app's recipe**. A LoRA made very differently
  (other rank, other layers, many more steps) is attacked less well; the Attack tab says when a file
  does not fit.
- The numbers quoted in the tabs are measured on LFW faces of people the models never saw
  (see README, *Measured results*); on your photos the result can be better or worse.
- A defense that "hides" you here is measured against this attacker only. Differential privacy's
  epsilon is a guarantee per photo; a person with 5 photos in the set is protected about 5 times
  less.
- The watermark proves which base model a LoRA came from; it does not protect your photos.

## Your photos
Your photos, crops, LoRA and reconstructions live in memory and in a temporary folder of your own
session; they are deleted within a minute of closing the page, or after {hours:g} hours without use. They
are never logged, never used to train anything shared, and never shown to anyone else; no other visitor's
request can read or use them. Your browser keeps no record of the visit (the app's run history is off),
so the next person at a shared computer finds nothing of it.
"""


def create_about_tab(engine: Engine) -> None:
    from core.finetune.hub import HubConfig

    hub = engine.hub_config or HubConfig()
    compiled = (
        " The fine-tune's step is compiled once when the app starts (a few minutes on a CPU, during which "
        "fine-tunes run uncompiled), then every fine-tune uses it (`--compile False` turns this off)."
        if hub.compile
        else ""
    )
    gr.Markdown(
        ABOUT.format(
            size=engine.image_size,
            device=engine.device,
            hours=SESSION_TTL / 3600,
            batch=hub.batch_size(engine.device),
            compiled=compiled,
        )
    )
