"""A visitor's private workspace: photos, crops and LoRAs in memory plus one temp dir of its own.

Held in a ``gr.State`` (one per browser session, never shared); deleted when the session ends
(Gradio calls ``close`` through the state's ``delete_callback``) or after its time to live.
Nothing in here is ever logged.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SESSION_TTL = 2 * 3600  # seconds a session's data may live at most


@dataclass
class VisitorSession:
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="leaklab-session-")))
    crops: list = field(default_factory=list)  # uint8 64x64x3 face crops, in memory
    result: object = None  # the last FinetuneResult
    trained_on: list = field(default_factory=list)  # the crops that result was fine-tuned on
    layer_steps: dict = field(default_factory=dict)  # {step: per-layer change} recorded during a fine-tune (ui.layers_tab)

    def close(self) -> None:
        self.crops.clear()
        self.trained_on.clear()
        self.layer_steps.clear()
        self.result = None
        shutil.rmtree(self.dir, ignore_errors=True)


def ensure(session: VisitorSession | None) -> VisitorSession:
    if session is None or not session.dir.exists():
        return VisitorSession()
    return session


def close_session(session: VisitorSession | None) -> None:
    if session is not None:
        session.close()
