"""The app starts offline on the embedded model and answers a gradio_client call."""

import socket

import numpy as np
import pytest
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def running_app(base_engine):
    import app

    demo = app.build_demo(base_engine)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo
    demo.close()


def test_sample_endpoint_answers_a_client(running_app):
    from gradio_client import Client

    client = Client(running_app.local_url, verbose=False)
    out = client.predict(3, 2, 5, 1.0, api_name="/sample")
    assert len(out) == 2
    img = np.asarray(Image.open(out[0]["image"]))
    assert img.shape[:2] == (64, 64) and img.std() > 5


def test_every_tab_is_there(running_app):
    labels = {b.label for b in running_app.blocks.values() if type(b).__name__ == "Tab"}
    assert {"Fine-tune", "Attack", "Layers", "Defenses", "Watermark", "About"} <= labels
