"""The Attack tab's metadata panel: what the uploaded LoRA file's metadata gives away, and a cleaned copy.

Only wiring: the scan and the cleaning live in :mod:`core.finetune.metadata`. The upload is read once
(:mod:`ui.uploads`), checked and scanned from a file in the visitor's own session dir, which is removed
right after; the cleaned copy is written into the session dir (served from there, deleted with the
session) and offered for download. Metadata values are the file author's text: they are shown inside
code spans, cut short, so no value can format the page or carry a link.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import gradio as gr

from core.finetune.lora_file import MAX_BYTES, LoRAFileError, too_large
from core.finetune.metadata import KINDS, MetadataError, Scan, clean_file, scan_file
from ui.session import ensure
from ui.uploads import UploadTooLarge, read_upload

INTRO = ("#### What its metadata gives away\nA `.safetensors` file carries a table of text beside the weights. Trainers "
         "fill it, and kohya's trainer (behind most LoRAs shared on model sites) writes the captions of every "
         "training photo, the training folders' names and photo counts, paths on the trainer's computer, dates and "
         "more. Check a file here before you share it, and download a copy with the same weights and only what "
         "loading needs.")
SHOWN = 120  # characters of a value shown in the table


def code(text, limit: int = SHOWN) -> str:
    """An untrusted string as an inline code span: printable, no backticks or table bars, cut short."""
    text = "".join(c if c.isprintable() else " " for c in str(text)).replace("`", "'").replace("|", "/")
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"`{text}`" if text.strip() else "*(empty)*"


def plain(text) -> str:
    """Text that may quote the file (a user name in a sentence) with markdown's special characters escaped."""
    return re.sub(r"([\\`*_{}\[\]()<>#|!~])", r"\\\1", str(text))


def scan_markdown(scan: Scan, name: str) -> tuple[str, str]:
    """(the leaks in words with what each says, a table of every other entry)."""
    leaks = scan.leaks
    if not scan.findings:
        return f"**{code(name, 60)} has no metadata** beyond its {scan.tensors} tensors: nothing to remove.", ""
    head = (f"**{code(name, 60)}: {len(scan.findings)} metadata entries, {len(leaks)} of them give something away**"
            if leaks else f"**{code(name, 60)}: {len(scan.findings)} metadata entries; none of them gives anything away "
                          "that this scanner knows of.**")
    lines = [head]
    if scan.triggers:
        lines.append("\n**The trigger word is written in the file:** " + ", ".join(code(t, 60) for t in scan.triggers)
                     + ". With it, anyone can ask the LoRA for its subject directly.")
    if leaks:
        lines.append("")
    for f in leaks:
        lines.append(f"- **{KINDS[f.kind]}**, {code(f.key, 60)} = {code(f.value, 80)}: {plain(f.why)}")
        lines += [f"    - {code(d, 200)}" for d in f.details]
    rest = [f for f in scan.findings if not f.leaks]
    lines.append(f"\nThe cleaned copy has the same weights, byte for byte, and keeps only what loading needs "
                 f"({', '.join(code(f.key, 40) for f in rest if f.keep) or 'no entry at all'}).")
    table = ["| entry | value | what it is | in the cleaned copy |", "|---|---|---|---|"]
    table += [f"| {code(f.key, 60)} | {code(f.value)} | {plain(f.why)} | {'kept' if f.keep else 'removed'} |" for f in rest]
    return "\n".join(lines), "\n".join(table) if rest else "No other entries."


def scan_upload(lora_path, session):
    """(the leaks in markdown, every other entry in markdown, path of the cleaned copy in the session dir or None)."""
    if not lora_path:
        return "Upload a LoRA .safetensors file first, then press **Check its metadata**.", "", None
    session = ensure(session)
    name = Path(lora_path).name
    try:
        raw = read_upload(lora_path, MAX_BYTES)
    except UploadTooLarge as e:
        return f"**This file was refused.** {too_large(name, e.size)}", "", None
    except OSError:
        return "**The LoRA file could not be found;** please upload it again.", "", None
    folder = session.dir / "uploads"
    folder.mkdir(exist_ok=True)
    private = folder / f"{secrets.token_hex(8)}-{Path(name).name}"
    try:
        private.write_bytes(raw)
        scan = scan_file(private)
        out = session.dir / "downloads"
        out.mkdir(exist_ok=True)
        cleaned = clean_file(private, out / f"{Path(name).stem}-clean.safetensors")
    except (MetadataError, LoRAFileError) as e:
        return f"**This file was refused.** {e}", "", None
    finally:
        private.unlink(missing_ok=True)
    return (*scan_markdown(scan, name), str(cleaned))


def create_metadata_panel(lora_file: gr.File, session: gr.State) -> None:
    """The panel (full width, under the Attack tab's results), reading the tab's file input ``lora_file``."""
    gr.Markdown(INTRO)
    with gr.Row():
        btn = gr.Button("Check its metadata", scale=1)
        download = gr.File(label="Cleaned copy: same weights, metadata removed", interactive=False, scale=2)
    report = gr.Markdown()
    with gr.Accordion("Every other entry of the metadata", open=False):
        rest = gr.Markdown()

    def run(f, s):
        s = ensure(s)
        return (*scan_upload(f, s), s)

    btn.click(run, [lora_file, session], [report, rest, download, session], api_name="scan_metadata",
              concurrency_limit=4, concurrency_id="scan_metadata")
