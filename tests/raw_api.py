"""Gradio's HTTP API spoken by hand, the way a hostile visitor (or a stranger who found a path in a
shared browser) can: any file path as a handler input, any session hash, raw uploads. gradio_client
would upload a local file instead of passing its path, so the isolation tests use this."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import httpx


def file_data(path) -> dict:
    """A FileData value naming ``path`` on the server (no upload)."""
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}, "orig_name": Path(path).name}


class Visitor:
    """One browser session of the app at ``url``, with its own session hash."""

    def __init__(self, url: str, session_hash: str | None = None):
        self.url = url.rstrip("/")
        self.session_hash = session_hash or secrets.token_hex(6)
        self.http = httpx.Client(timeout=180)
        self.config = self.http.get(f"{self.url}/config").json()

    def close(self):
        self.http.close()

    def upload(self, path, name: str | None = None) -> str:
        """POST the file to Gradio's upload route; the server path it answers."""
        with open(path, "rb") as f:
            r = self.http.post(f"{self.url}/gradio_api/upload", files=[("files", (name or Path(path).name, f))])
        r.raise_for_status()
        return r.json()[0]

    def _dependency(self, api_name: str) -> dict:
        return next(d for d in self.config["dependencies"] if d.get("api_name") == api_name)

    def call(self, api_name: str, *values):
        """Run an endpoint in this session: (True, outputs) or (False, the error message). ``values``
        are the endpoint's inputs without its session states (filled by the server, as for a browser);
        trailing inputs left out take their widget's default value."""
        dep = self._dependency(api_name)
        types = {c["id"]: c.get("type") for c in self.config["components"]}
        defaults = {c["id"]: (c.get("props") or {}).get("value") for c in self.config["components"]}
        given = iter(values)  # inputs not given take their widget's default, as a browser sends them
        data = [None if types.get(i) == "state" else next(given, defaults.get(i)) for i in dep["inputs"]]
        r = self.http.post(
            f"{self.url}/gradio_api/queue/join",
            json={
                "data": data,
                "fn_index": dep["id"],
                "session_hash": self.session_hash,
                "event_data": None,
                "trigger_id": None,
            },
        )
        r.raise_for_status()
        with self.http.stream(
            "GET", f"{self.url}/gradio_api/queue/data", params={"session_hash": self.session_hash}
        ) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    out = msg.get("output") or {}
                    if msg.get("success"):  # the session states are not sent back to a browser either
                        data = out.get("data") or []
                        return True, [v for i, v in zip(dep["outputs"], data) if types.get(i) != "state"]
                    return False, str(out.get("error") or out)
        raise RuntimeError("the event stream ended without a result")


def as_upload(path) -> Path:
    """A local file as the app receives an upload (Gradio's folder, then made private): for tests that
    call a handler function directly."""
    import shutil

    from gradio.utils import get_upload_folder

    from ui.uploads import make_private

    shared = Path(get_upload_folder()) / secrets.token_hex(32) / Path(path).name
    shared.parent.mkdir(parents=True)
    shutil.copyfile(path, shared)
    return make_private(shared)


def server_path(item) -> Path:
    """The server's file behind a gallery item / file output."""
    if isinstance(item, (list, tuple)) and item and isinstance(item[0], dict):
        item = item[0]
    if isinstance(item, dict) and "image" in item:
        item = item["image"]
    if isinstance(item, dict):
        item = item["path"]
    return Path(item)
