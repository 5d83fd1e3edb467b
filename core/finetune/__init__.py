"""Fine-tuning on a person's photos: what the victim does, and the file they share.

- ``lora``: the DreamBooth LoRA fine-tune (a generator of events), LoRA export and loading;
- ``live``: the visitor's live job (fine-tune or DP-SGD, defense, live attack, previews, scoring);
- ``batch``: many LoRAs trained in one stacked forward (continuous batching: runs join and leave between steps);
- ``hub``: the app's training hub: every visitor's run through one worker, each with their own event stream;
- ``live_batch``: the live work of many visitors' checkpoints at once (one stacked sampler call per kind);
- ``full``: the full fine-tune of the UNet (the busy/lazy layers' comparison);
- ``clipping``: per-sample gradient clipping (DP-SGD, the shadow trainer);
- ``lora_file``: validation of an uploaded LoRA file (safetensors only, header table, limits, shapes,
  orientation, finite and bounded values);
- ``errors``: the typed error of a refused file;
- ``formats``: the namings people share LoRAs in (diffusers, peft, kohya-ss / A1111, LoCon) read into one
  form, other adapters and model families refused by name;
- ``metadata``: what a LoRA file's metadata gives away, and a cleaned copy (``python -m core.finetune.metadata``).
"""
