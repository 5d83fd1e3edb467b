"""A LoRA file a visitor uploads, read for any tab (Attack, Layers, the membership panel): only the
visitor's own upload (:mod:`ui.uploads`), checked by :func:`core.finetune.lora_file.validate_lora_file`
where it lies and deleted right after; what came of it is kept in the visitor's session.

Only wiring: the checks live in :mod:`core.finetune.lora_file`."""

from __future__ import annotations

from pathlib import Path

from core.engine import Engine
from core.finetune.lora_file import MAX_BYTES as MAX_LORA_BYTES
from core.finetune.lora_file import LoRAFileError, ValidatedLoRA, too_large, validate_lora_file
from ui.uploads import UploadError, UploadTooLarge, local_file


def read_lora_upload(engine: Engine, lora_path, session, need_unet: bool = True) -> ValidatedLoRA:
    """Validate a LoRA file input (:mod:`ui.uploads`: only the visitor's own upload, checked where it
    lies, in a private folder under the visitor's own file name, and deleted right after). What came
    of it, the checked LoRA or its refusal, is kept in the session for this visitor's own re-sends
    (the latest LoRA only); raises :class:`LoRAFileError`. ``need_unet``: refuse a LoRA of the text
    encoder alone (the attacks read UNet layers; the membership check does not need them)."""
    if session is None:
        return _read(engine, lora_path, None, need_unet)
    with session.reading:  # the upload's own handler may be reading it right now: wait for what it made
        return _read(engine, lora_path, session, need_unet)


def _read(engine: Engine, lora_path, session, need_unet: bool) -> ValidatedLoRA:
    known = session.reads.get(str(lora_path)) if session is not None else None
    if isinstance(known, (ValidatedLoRA, LoRAFileError)):
        if isinstance(known, LoRAFileError):
            raise known
        return known
    try:
        with local_file(lora_path, session, MAX_LORA_BYTES) as path:
            result = validate_lora_file(path, engine.pipe, need_unet=need_unet)
    except UploadError as e:
        result = lora_refusal(lora_path, e)
    except LoRAFileError as e:
        result = e
    if session is not None and getattr(result, "reason", "") != "upload":  # not what a path it may not use gave
        for k in [k for k, v in session.reads.items() if isinstance(v, ValidatedLoRA)]:
            del session.reads[k]  # one checked LoRA per session in memory
        session.remember(str(lora_path), result)
    if isinstance(result, LoRAFileError):
        raise result
    return result


def lora_refusal(lora_path, err: UploadError) -> LoRAFileError:
    """The refusal of a LoRA file input a handler cannot use: too large (its reason "too_large"), or not
    the visitor's own upload / no longer there (reason "upload")."""
    if isinstance(err, UploadTooLarge):
        return too_large(Path(lora_path).name, err.size)
    return LoRAFileError("upload", f"The LoRA file was not used: {err}")


def describe_lora(lora) -> str:
    """The uploaded LoRA in a few words: its format, rank(s), alpha(s) and layers."""
    ranks, alphas = sorted(set(lora.ranks.values())), sorted(set(lora.alphas.values()))
    rank = f"rank {lora.rank}" if len(ranks) < 2 else f"ranks {ranks[0]}-{ranks[-1]} per layer (mostly {lora.rank})"
    alpha = f"alpha {lora.alpha:g}" if len(alphas) < 2 else f"alpha {alphas[0]:g}-{alphas[-1]:g} per layer"
    te = sum(1 for k in lora.ranks if k.startswith("text_encoder."))
    layers = f"{len(lora.modules)} UNet layers" + (f" and {te} text-encoder layers" if te else "")
    return f"{lora.described}, {rank}, {alpha}, {layers}"
