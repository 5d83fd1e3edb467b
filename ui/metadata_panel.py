"""The Attack tab's metadata panel: what the uploaded LoRA file's metadata gives away, and a cleaned copy.

Only wiring: the scan and the cleaning live in :mod:`core.finetune.metadata`. Only the visitor's own
upload is read (:mod:`ui.uploads`), once, when it arrives: the Attack tab's upload handler checks the LoRA
and scans its metadata in the same reading (:func:`scan_arrived`), and the button shows what the scan
kept in the session. The cleaned copy is written into the session dir (served from there, deleted with
the session; one per session) and offered for download. Metadata values are the file author's text:
they are shown inside code spans, cut short, so no value can format the page or carry a link.
"""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr

from core.finetune.lora_file import MAX_BYTES, LoRAFileError, too_large
from core.finetune.metadata import KINDS, MetadataError, Scan, clean_file, scan_file
from ui.session import ensure
from ui.uploads import UploadError, UploadTooLarge, local_file

INTRO = (
    "#### What its metadata gives away\nA `.safetensors` file carries a table of text beside the weights. Trainers "
    "fill it, and kohya's trainer (behind most LoRAs shared on model sites) writes the captions of every "
    "training photo, the training folders' names and photo counts, paths on the trainer's computer, dates and "
    "more. Check a file here before you share it, and download a copy with the same weights and only what "
    "loading needs."
)
SHOWN = 120  # characters of a value shown in the table
READ_KEY = "metadata:"  # the session keeps a file input's scan under this prefix + its path (VisitorSession.reads)


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
    head = (
        f"**{code(name, 60)}: {len(scan.findings)} metadata entries, {len(leaks)} of them give something away**"
        if leaks
        else f"**{code(name, 60)}: {len(scan.findings)} metadata entries; none of them gives anything away "
        "that this scanner knows of.**"
    )
    lines = [head]
    if scan.triggers:
        lines.append(
            "\n**The trigger word is written in the file:** "
            + ", ".join(code(t, 60) for t in scan.triggers)
            + ". With it, anyone can ask the LoRA for its subject directly."
        )
    if leaks:
        lines.append("")
    for f in leaks:
        lines.append(f"- **{KINDS[f.kind]}**, {code(f.key, 60)} = {code(f.value, 80)}: {plain(f.why)}")
        lines += [f"    - {code(d, 200)}" for d in f.details]
    rest = [f for f in scan.findings if not f.leaks]
    lines.append(
        f"\nThe cleaned copy has the same weights, byte for byte, and keeps only what loading needs "
        f"({', '.join(code(f.key, 40) for f in rest if f.keep) or 'no entry at all'})."
    )
    table = ["| entry | value | what it is | in the cleaned copy |", "|---|---|---|---|"]
    table += [
        f"| {code(f.key, 60)} | {code(f.value)} | {plain(f.why)} | {'kept' if f.keep else 'removed'} |" for f in rest
    ]
    return "\n".join(lines), "\n".join(table) if rest else "No other entries."


def scan_local(path: Path, name: str, session) -> tuple[str, str, str | None]:
    """(the leaks in markdown, every other entry in markdown, path of the cleaned copy in the session dir or
    None) of a readable file ``path``, the visitor's file called ``name``."""
    try:
        scan = scan_file(path)
        out = session.dir / "downloads"
        out.mkdir(exist_ok=True)
        cleaned = clean_file(path, out / f"{Path(name).stem}-clean.safetensors")
    except (MetadataError, LoRAFileError) as e:
        return f"**This file was refused.** {e}", "", None
    return (*scan_markdown(scan, name), str(cleaned))


def _remember(lora_path, result: tuple, session) -> None:
    """Keep what the scan of a file input gave for this visitor's button (one scan, one cleaned copy per session)."""
    for key in [k for k in session.reads if isinstance(k, str) and k.startswith(READ_KEY)]:
        old = session.reads.pop(key)[2]
        if old and old != result[2]:
            Path(old).unlink(missing_ok=True)
    session.remember(READ_KEY + str(lora_path), result)


def scan_arrived(lora_path, path, session) -> None:
    """Scan a LoRA file input when it arrives (readable at ``path`` now: an upload is read once, then gone,
    :mod:`ui.uploads`), for the button to show later."""
    _remember(lora_path, scan_local(Path(path), Path(lora_path).name, session), session)


def remember_refusal(lora_path, message: str, session) -> None:
    """A file input refused before it could be scanned (too large): the button says so too."""
    _remember(lora_path, (f"**This file was refused.** {message}", "", None), session)


def scan_upload(lora_path, session):
    """(the leaks in markdown, every other entry in markdown, path of the cleaned copy in the session dir or
    None): the scan made when the file arrived, else a scan of the visitor's own upload now."""
    if not lora_path:
        return "Upload a LoRA .safetensors file first, then press **Check its metadata**.", "", None
    session = ensure(session)
    with session.reading:  # the upload's own handler may be reading it right now: wait for its scan
        return _scan_once(lora_path, session)


def _scan_once(lora_path, session):
    known = session.reads.get(READ_KEY + str(lora_path))
    if known is not None:
        return known
    name = Path(lora_path).name
    try:
        with local_file(lora_path, session, MAX_BYTES) as path:
            result = scan_local(path, name, session)
    except UploadTooLarge as e:
        return f"**This file was refused.** {too_large(name, e.size)}", "", None
    except UploadError as e:  # not the visitor's own upload, or no longer there
        return f"**This file was refused.** The LoRA file was not used: {e}", "", None
    _remember(lora_path, result, session)
    return result


def create_metadata_panel(lora_file: gr.File, session: gr.State, read_input=None) -> None:
    """The panel (full width, under the Attack tab's results), reading the tab's file input ``lora_file``;
    ``read_input(path, session)``: the tab's one reading of that input (it scans too), run first."""
    gr.Markdown(INTRO)
    with gr.Row():
        btn = gr.Button("Check its metadata", scale=1)
        download = gr.File(label="Cleaned copy: same weights, metadata removed", interactive=False, scale=2)
    report = gr.Markdown()
    with gr.Accordion("Every other entry of the metadata", open=False):
        rest = gr.Markdown()

    def run(f, s, request: gr.Request):
        s = ensure(s, request)
        if f and read_input is not None:
            read_input(f, s)
        return (*scan_upload(f, s), s)

    btn.click(
        run,
        [lora_file, session],
        [report, rest, download, session],
        api_name="scan_metadata",
        concurrency_limit=4,
        concurrency_id="scan_metadata",
    )
