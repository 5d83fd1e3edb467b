"""What a LoRA file's metadata gives away, and a cleaned copy without it.

A ``.safetensors`` file carries a free-form string table beside the weights. Trainers fill it: kohya's
sd-scripts (the trainer behind most shared LoRAs) writes some eighty ``ss_*`` entries, among them the
caption tags of every training photo with their counts (``ss_tag_frequency``), the training folders
by name with their photo counts (``ss_dataset_dirs``, whose kohya names are ``<repeats>_<trigger>
<class>``), the output name, a free training comment, start and end times, hashes of the exact base
model file and of the training session, and often absolute paths with the trainer's user name.
:func:`scan_file` lists **every** key, flags the ones that leak (key rules for the known trainers'
entries, value rules for paths with user names, e-mail and web addresses, long hashes, dates,
embedded pictures) with a sentence in plain words, and decodes the big JSON ones (tags, folders)
into what they say. :func:`clean_file` writes a copy whose tensors are the same bytes and whose
metadata keeps only what loading needs (:data:`KEEP`, and only where the value leaks nothing).

Why the copy is written here rather than with ``safetensors.torch.save_file``: the library has no
call that replaces only the metadata, and decoding then re-encoding every tensor would cost memory
and could change bytes (e.g. a non-contiguous view, a dtype round trip); copying the data section
verbatim and writing a new JSON header guarantees the same bytes, and safetensors itself reads the
result back before it is kept.

CLI: ``python -m core.finetune.metadata scan FILE`` and ``python -m core.finetune.metadata clean FILE --out CLEAN``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tyro.conf import Positional

# what loading needs: diffusers' adapter settings (rank, alpha) and this app's own alpha / base check
KEEP = (
    "format",
    "lora_adapter_metadata",
    "leaklab_alpha",
    "leaklab_rank",
    "leaklab_format",
    "leaklab_base_model",
    "leaklab_base_fingerprint",
)
MAX_SHOWN = 300  # characters of a value shown
TOP_TAGS = 12  # caption tags shown per folder

KINDS = {  # kind -> heading in plain words
    "captions": "the captions of the training photos",
    "dataset": "the training photos' folders and numbers",
    "trigger": "the trigger word",
    "name": "a name",
    "comment": "text written by the trainer",
    "path": "a path on the trainer's computer",
    "hash": "an identifier that links files",
    "date": "when it was trained",
    "steps": "how long it was trained",
    "image": "a picture",
    "contact": "an address",
}


@dataclass(frozen=True)
class Finding:
    """One metadata entry: what it is, and whether (and why) it leaks."""

    key: str
    value: str  # the value, printable and cut to MAX_SHOWN characters
    kind: str  # a key of KINDS when it leaks, "" when not
    why: str  # in plain words
    details: tuple[str, ...] = ()  # what a big JSON value says, decoded (tags with counts, folders ...)
    keep: bool = False  # kept in the cleaned copy

    @property
    def leaks(self) -> bool:
        return bool(self.kind)


@dataclass
class Scan:
    findings: list[Finding]
    tensors: int  # tensors in the file
    triggers: list[str] = field(default_factory=list)  # likely trigger words the metadata spells out

    @property
    def leaks(self) -> list[Finding]:
        return [f for f in self.findings if f.leaks]


class MetadataError(ValueError):
    """The file cannot be scanned: ``str(err)`` says why, for the visitor."""


# 1. decoding the big entries -------------------------------------------------------------------


def _json(value: str):
    try:
        return json.loads(value)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's parser goes (a hostile file)
        return None


def folder_trigger(folder: str) -> str | None:
    """kohya's folder names are ``<repeats>_<trigger> <class>``: the words after the repeat count."""
    m = re.match(r"^\s*\d+_(.+)$", Path(str(folder).replace("\\", "/")).name)
    return m.group(1).strip() if m else None


def decode_tags(value: str) -> list[str]:
    """``ss_tag_frequency`` ({folder: {tag: photos}}) as one line per folder, most frequent tags first."""
    data = _json(value)
    if not isinstance(data, dict):
        return []
    lines = []
    for folder, tags in data.items():
        if isinstance(tags, dict):
            top = sorted(((str(t), c) for t, c in tags.items()), key=lambda tc: -_num(tc[1]))
            more = f" and {len(top) - TOP_TAGS} more tags" if len(top) > TOP_TAGS else ""
            lines.append(
                f"folder {_cut(folder, 60)!r}: " + ", ".join(f"{_cut(t, 40)!r} x{c}" for t, c in top[:TOP_TAGS]) + more
            )
    return lines


def decode_dirs(value: str) -> list[str]:
    """``ss_dataset_dirs`` ({folder: {n_repeats, img_count}}) as one line per folder."""
    data = _json(value)
    if not isinstance(data, dict):
        return []
    return [
        f"folder {_cut(k, 80)!r}: {v.get('img_count', '?')} photos, repeated {v.get('n_repeats', '?')}x"
        for k, v in data.items()
        if isinstance(v, dict)
    ]


def decode_datasets(value: str) -> list[str]:
    """``ss_datasets`` (a list of datasets with subsets: image_dir, class_tokens, img_count ...)."""
    data = _json(value)
    lines = []
    for ds in data if isinstance(data, list) else []:
        for sub in (ds.get("subsets") or []) if isinstance(ds, dict) else []:
            if isinstance(sub, dict):
                parts = [
                    f"{k} {_cut(sub[k], 80)!r}"
                    for k in ("image_dir", "class_tokens", "img_count", "num_repeats")
                    if k in sub
                ]
                lines.append("subset: " + ", ".join(parts))
    return lines


def decode_buckets(value: str) -> list[str]:
    data = _json(value)
    buckets = data.get("buckets") if isinstance(data, dict) else None
    if not isinstance(buckets, dict):
        return []
    return [
        f"{b.get('resolution', '?')}: {b.get('count', '?')} photos" for b in buckets.values() if isinstance(b, dict)
    ]


def decode_time(value: str) -> list[str]:
    try:
        t = float(value)
    except ValueError:
        return []
    if 946_684_800 <= t <= 4_102_444_800:  # 2000 .. 2100
        return [dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")]
    return []


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return 0.0


def _cut(text, limit: int = MAX_SHOWN) -> str:
    text = "".join(c if c.isprintable() else " " for c in str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


# 2. the rules ----------------------------------------------------------------------------------

# (keys, kind, why, decoder) for the entries trainers are known to write
KEY_RULES: list[tuple[tuple[str, ...], str, str, Callable | None]] = [
    (
        ("ss_tag_frequency",),
        "captions",
        "The caption tags of every training photo and how many photos carried each: a description of the private "
        "photos themselves (who is in them, what they wear, where they were taken). A folder's most frequent tag is "
        "usually the trigger word.",
        decode_tags,
    ),
    (
        ("ss_dataset_dirs", "ss_reg_dataset_dirs"),
        "dataset",
        "The training folders by name, with how many photos each held. kohya names a folder by its repeat count, "
        "trigger word and class (for example '10_sks woman'), so the names spell out the trigger word.",
        decode_dirs,
    ),
    (
        ("ss_datasets",),
        "dataset",
        "The training set's description: its folders (often full paths), the trigger words ('class_tokens') and how "
        "many photos each part held.",
        decode_datasets,
    ),
    (
        ("ss_bucket_info",),
        "dataset",
        "How many training photos fell into each image size: the number and the shapes of the private photos.",
        decode_buckets,
    ),
    (
        ("ss_num_train_images", "ss_num_reg_images", "ss_num_batches_per_epoch"),
        "dataset",
        "How many photos the LoRA was trained on.",
        None,
    ),
    (
        ("ss_output_name", "modelspec.title", "name", "ss_training_name"),
        "name",
        "The name the trainer gave the LoRA, very often the person's name or nickname.",
        None,
    ),
    (("modelspec.author", "author"), "name", "The author's name or handle.", None),
    (
        ("ss_training_comment", "modelspec.description", "modelspec.usage_hint", "description", "comment"),
        "comment",
        "Free text written by the trainer; it often names the person, the occasion or the trigger word.",
        None,
    ),
    (
        ("modelspec.trigger_phrase", "trigger_word", "trigger_words", "ss_trigger_word", "activation_text"),
        "trigger",
        "The trigger word: with it anyone can ask the LoRA for its subject directly (the one secret this app's "
        "attacker works without).",
        None,
    ),
    (
        ("ss_training_started_at", "ss_training_finished_at", "modelspec.date", "training_date"),
        "date",
        "When the LoRA was trained.",
        decode_time,
    ),
    (
        ("ss_session_id",),
        "hash",
        "A random number of the training run, the same in every file that run saved: it "
        "links this LoRA to its other epochs and copies.",
        None,
    ),
    (
        ("sshs_model_hash", "sshs_legacy_hash"),
        "hash",
        "A hash of this file's weights, which model sites use to find copies of it.",
        None,
    ),
    (
        ("ss_sd_model_hash", "ss_new_sd_model_hash", "ss_vae_hash", "ss_new_vae_hash", "modelspec.hash_sha256"),
        "hash",
        "A hash of the exact base model or autoencoder file on the trainer's computer; a private or custom checkpoint "
        "is singled out by it.",
        None,
    ),
    (
        ("ss_sd_model_name", "ss_vae_name"),
        "name",
        "The file name of the base model (or autoencoder) on the trainer's computer.",
        None,
    ),
    (
        ("modelspec.thumbnail", "thumbnail"),
        "image",
        "A picture stored in the file, often a generated picture of the person.",
        None,
    ),
    (
        ("ss_steps", "leaklab_steps", "ss_epoch", "ss_max_train_steps"),
        "steps",
        "How long the LoRA was trained (steps or epochs). This app's attacker reads the step count as its step token; "
        "without it the attacker has to guess.",
        None,
    ),
]
NEEDED = {
    "format": "The file's tensor framework ('pt'); loaders expect it.",
    "lora_adapter_metadata": "The adapter settings diffusers reads to load the LoRA (rank, alpha, layers).",
    "leaklab_alpha": "The LoRA's alpha (its strength), read by this app.",
    "leaklab_rank": "The LoRA's rank, read by this app.",
    "leaklab_format": "This app's file-format version.",
    "leaklab_base_model": "Which base model the LoRA was made for, read by this app.",
    "leaklab_base_fingerprint": "A fingerprint of the public base model's weights, read by this app to check the "
    "LoRA fits.",
}
EMPTY = ("", "none", "null", "(unknown)", "{}", "[]")
SETTING = "A training setting (how the LoRA was trained, not on what)."
UNKNOWN = "An entry this scanner does not know; nothing in its value looks like a leak, but read it yourself."

USER_PATH = re.compile(
    r"(?:/home/|/Users/|/mnt/[a-z]/Users/|[A-Za-z]:[\\/]+(?:Users|Documents and Settings)[\\/]+)"
    r"([^/\\\"',:]+)"
)
ANY_PATH = re.compile(
    r"(?:^|[\s\"'(\[=])(?:/(?:home|Users|mnt|media|data|root|tmp|workspace|content|kaggle|opt|srv)/"
    r"|[A-Za-z]:[\\/]|~/)"
)
EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
URL = re.compile(r"https?://\S+")
LONG_HEX = re.compile(r"\b(?:0x)?[0-9a-fA-F]{32,}\b")
DATE = re.compile(r"\b(?:19|20)\d\d-[01]\d-[0-3]\d")
USER_WORDS = ("user", "root", "admin", "public", "default", "shared")


def _value_rule(key: str, value: str) -> tuple[str, str] | None:
    """(kind, why) when a value leaks whatever its key: a path with a user name, an e-mail or web address,
    a long hash, a date; None otherwise."""
    m = USER_PATH.search(value)
    if m and m.group(1).lower() not in USER_WORDS:
        return "path", (
            f"A path on the trainer's computer, with their user name ({_cut(m.group(1), 40)!r}) and the "
            "names of their folders."
        )
    if ANY_PATH.search(value):
        return "path", "A path on the trainer's computer: the names of their folders."
    if EMAIL.search(value):
        return "contact", "An e-mail address."
    if URL.search(value):
        return "contact", "A web address, which may lead to the trainer's profile."
    if LONG_HEX.search(value) and key not in NEEDED:
        return "hash", "A long hash, which links this file to other files (the same base model copy, the same run)."
    if DATE.search(value) and key not in NEEDED:
        return "date", "A date, probably of the training."
    return None


def classify(key: str, value: str) -> Finding:
    """The finding of one metadata entry."""
    shown = _cut(value)
    if value.strip().lower() in EMPTY:
        return Finding(key, shown, "", "Empty: it gives nothing away.", keep=key in NEEDED)
    for keys, kind, why, decode in KEY_RULES:
        if key in keys:
            details = tuple(decode(value)) if decode else ()
            extra = _value_rule(key, value)
            if extra and extra[0] == "path" and kind != "path":
                why += " It also holds " + extra[1][0].lower() + extra[1][1:]
            return Finding(key, shown, kind, why, details)
    extra = _value_rule(key, value)
    if key in NEEDED:
        if extra:
            return Finding(key, shown, extra[0], extra[1] + " (Loading does not need it with this value: dropped.)")
        return Finding(key, shown, "", NEEDED[key], keep=True)
    if extra:
        return Finding(key, shown, *extra)
    known = key.startswith(("ss_", "modelspec.", "sshs_", "leaklab_"))
    return Finding(key, shown, "", SETTING if known else UNKNOWN)


def likely_triggers(meta: dict) -> list[str]:
    """Trigger words the metadata spells out: kohya folder names, class tokens, a trigger phrase."""
    out: list[str] = []
    for key in ("ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency"):
        data = _json(meta.get(key, ""))
        if isinstance(data, dict) and key != "ss_reg_dataset_dirs":
            out += [t for t in (folder_trigger(k) for k in data) if t]
    for ds in _json(meta.get("ss_datasets", "")) or []:
        for sub in (ds.get("subsets") or []) if isinstance(ds, dict) else []:
            if isinstance(sub, dict) and sub.get("class_tokens"):
                out.append(str(sub["class_tokens"]))
    for key in ("modelspec.trigger_phrase", "trigger_word", "ss_trigger_word"):
        if meta.get(key):
            out.append(meta[key])
    seen: list[str] = []
    for t in out:
        t = _cut(t, 80)
        if t not in seen:
            seen.append(t)
    return seen


def scan_metadata(meta: dict, tensors: int = 0) -> Scan:
    """Every entry of a metadata table, classified: the leaks first, by kind (captions first), then the rest
    by name (safetensors does not keep the order a trainer wrote them in)."""
    order = list(KINDS)
    findings = sorted(
        (classify(str(k), str(v)) for k, v in meta.items()),
        key=lambda f: (order.index(f.kind) if f.leaks else len(order), f.key),
    )
    return Scan(findings, tensors, likely_triggers(meta))


# 3. the file -----------------------------------------------------------------------------------


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(the safetensors header as a dict, the byte offset where the tensor data starts) of an untrusted
    file, after the size, pickle and header checks of :mod:`core.finetune.lora_file` and a read of the
    tensor table by safetensors itself (so offsets and lengths are consistent)."""
    from safetensors import safe_open

    from core.finetune.lora_file import MAX_TENSORS, LoRAFileError, _check_header, _check_size

    path = Path(path)
    try:
        size = _check_size(path)
        _check_header(path, size)
    except LoRAFileError as e:
        raise MetadataError(str(e)) from None
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n).decode("utf-8"))
    try:
        with safe_open(str(path), framework="pt") as f:
            count = len(list(f.keys()))
    except Exception as e:  # safetensors' own errors for a malformed table
        raise MetadataError(
            f"The file is not a readable .safetensors file ({type(e).__name__}); nothing to scan."
        ) from None
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise MetadataError("The file's metadata is not a table of text entries, as safetensors requires.")
    if count > MAX_TENSORS:
        raise MetadataError(f"The file holds {count} tensors; at most {MAX_TENSORS} are accepted.")
    return header, 8 + n


def scan_file(path: str | os.PathLike) -> Scan:
    """Every metadata entry of a safetensors file, the leaking ones flagged and explained."""
    header, _ = read_header(path)
    return scan_metadata(header.get("__metadata__", {}), sum(1 for k in header if k != "__metadata__"))


def cleaned_metadata(meta: dict) -> dict:
    """The entries loading needs and that leak nothing."""
    return {f.key: meta[f.key] for f in scan_metadata(meta).findings if f.keep}


def clean_file(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``out``: the same tensors, byte for byte, with only :func:`cleaned_metadata` as metadata."""
    from safetensors import safe_open

    path, out = Path(path), Path(out)
    if out.exists() and out.resolve() == path.resolve():
        raise MetadataError("The cleaned copy must go to another file than the original.")
    header, start = read_header(path)
    kept = cleaned_metadata(header.get("__metadata__", {}))
    new = {k: v for k, v in header.items() if k != "__metadata__"}
    if kept:
        new = {"__metadata__": kept, **new}
    text = json.dumps(new, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header so the data starts 8-byte aligned
    tmp = out.with_name(out.name + ".tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        src.seek(start)
        dst.write(struct.pack("<Q", len(text)) + text)
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    try:
        with safe_open(str(tmp), framework="pt") as f:  # safetensors reads the copy back before it is kept
            assert (f.metadata() or {}) == kept and len(list(f.keys())) == len(new) - bool(kept)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out


# 4. CLI ----------------------------------------------------------------------------------------


def format_scan(scan: Scan) -> str:
    """The scan as plain text (the CLI's output)."""
    leaks = scan.leaks
    lines = [
        f"{len(scan.findings)} metadata entries, {len(leaks)} of them give something away; {scan.tensors} tensors."
    ]
    if scan.triggers:
        lines.append("likely trigger word(s): " + ", ".join(repr(t) for t in scan.triggers))
    for f in scan.findings:
        mark = f"! {KINDS[f.kind]}" if f.leaks else ("  kept" if f.keep else "  ")
        lines.append(f"{mark:40s} {f.key} = {_cut(f.value, 120)}")
        lines.append(f"{'':40s}   {f.why}")
        lines += [f"{'':40s}   - {d}" for d in f.details]
    return "\n".join(lines)


@dataclass
class ScanArgs:
    """Show every metadata entry of a LoRA file, the ones that give something away flagged."""

    file: Positional[str]  # the .safetensors file to scan


@dataclass
class CleanArgs:
    """Write a copy with the same tensors and only the metadata loading needs."""

    file: Positional[str]  # the .safetensors file to clean
    out: str  # where the cleaned copy goes (not the original file)


def main(argv=None) -> int:
    from core.cli import parse_commands

    name, args = parse_commands(
        {"scan": ScanArgs, "clean": CleanArgs},
        argv,
        description=__doc__.split("\n")[0],
        prog="python -m core.finetune.metadata",
    )
    try:
        if name == "scan":
            print(format_scan(scan_file(args.file)))
            return 0
        before = scan_file(args.file)
        out = clean_file(args.file, args.out)
        after = scan_file(out)
        print(
            f"{args.out}: same {after.tensors} tensors, byte for byte; metadata {len(before.findings)} -> "
            f"{len(after.findings)} entries ({', '.join(f.key for f in after.findings) or 'none'} kept)"
        )
        return 0
    except MetadataError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    raise SystemExit(main())
