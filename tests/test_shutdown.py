"""Nothing of a visit outlives the server: the session root and the uploads are emptied when the app
starts (an earlier server may have crashed) and when it stops, also when it is stopped with SIGTERM
(a Space restarting, a container shut down)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from core import PROJECT_ROOT
from tests.bad_inputs import private_photos
from tests.conftest import launched_app
from ui import session as sess


def test_session_root_is_emptied_at_start_up_and_shutdown(tiny_engine):
    from ui import uploads

    leftover = sess.SESSION_ROOT / "leaklab-session-left-by-a-crash"
    leftover.mkdir(parents=True, exist_ok=True)
    (leftover / "crop.png").write_bytes(b"a face")
    stray = (uploads.upload_root() / ("0" * 32) / "me.jpg") if hasattr(uploads, "upload_root") else leftover / "x"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"an upload")
    for _demo in launched_app(tiny_engine):
        assert not leftover.exists() and not stray.exists()
        s = sess.ensure(None)
        (s.dir / "lora.safetensors").write_bytes(b"x")
        held = s.dir
    assert not held.exists() and not any(sess.SESSION_ROOT.glob("*"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files_under(*folders) -> list[Path]:
    return [p for f in folders if Path(f).exists() for p in Path(f).rglob("*") if p.is_file()]


def test_sigterm_leaves_no_visitor_file(tiny_pipeline_dir, tmp_path):
    """``python app.py`` with a visitor's crops on disk (raw API, no browser: no unload would ever come),
    then SIGTERM: the process exits and no file of the visit is left."""
    import httpx

    from tests.raw_api import Visitor, file_data

    roots = {"LEAKLAB_SESSION_ROOT": tmp_path / "sessions", "GRADIO_TEMP_DIR": tmp_path / "gradio"}
    env = {**os.environ, **{k: str(v) for k, v in roots.items()}, "LEAKLAB_CACHE": str(tmp_path / "cache")}
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--model", str(tiny_pipeline_dir), "--device", "cpu", "--port", str(port)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/config", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        v = Visitor(url)
        ok, (crops, report) = v.call(
            "ingest", [file_data(v.upload(p)) for p in private_photos(tmp_path, 0, tag="term")]
        )
        assert ok and "3 usable photos" in report
        assert files_under(*roots.values())  # the visit's crops are on disk
        v.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert files_under(roots["LEAKLAB_SESSION_ROOT"]) == []
    left = [p for p in files_under(roots["GRADIO_TEMP_DIR"]) if p.stat().st_size]
    assert left == [], left
