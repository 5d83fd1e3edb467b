"""Fine-tuning on a person's photos: what the victim does, and the file they share.

- ``lora``: the DreamBooth LoRA fine-tune (a generator of events), LoRA export and loading;
- ``lora_file``: validation of an uploaded LoRA file (safetensors only, limits, shapes, finite).
"""
