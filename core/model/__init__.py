"""The diffusion model itself: the embedded miniature Stable Diffusion and what builds it.

- ``pipeline``: build, load (embedded folder, saved folder or SD 1.x model id), save and sample a
  ``StableDiffusionPipeline``;
- ``sampling``: one sampler loop for extrapolated (base vs fine-tuned) and stacked-LoRA sampling;
- ``autoencoder``: the tiny pretrained autoencoder (TAEF2 weights) as a diffusers component;
- ``denoising``: the one training step every trainer shares (noise, target, min-SNR, masked loss);
- ``prompts``: the word-level vocabulary, class prompt, reserved trigger words, appearance words;
- ``train_base``: the base model's training recipe (``python -m core.model.train_base``);
- ``prior``: cached class images for prior preservation;
- ``examples``: the example "people" the app offers, drawn by the base model.
"""
