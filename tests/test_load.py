"""Load, through gradio_client on the app built on the tiny random pipeline: 20 simultaneous requests
all get served, none refused, and a room of visitors can all wait for the training hub at once
(visitors training together: tests/test_workshop.py)."""

import pytest

from tests.conftest import launched_app


@pytest.fixture(scope="module")
def app(tiny_engine):
    yield from launched_app(tiny_engine)


def clients(url, n):
    from gradio_client import Client

    return [Client(url, verbose=False, download_files=False) for _ in range(n)]


def test_twenty_simultaneous_requests_are_all_served(app):
    cs = clients(app.local_url, 20)  # 20 browser sessions
    try:
        jobs = [c.submit(i, 1, 5, 1.0, api_name="/sample") for i, c in enumerate(cs)]
        assert all(len(job.result(timeout=120)) == 1 for job in jobs)
    finally:
        for c in cs:
            c.close()
    q = app._queue
    assert q.max_size is None or q.max_size >= 20  # room in line for a workshop's worth of visitors
    from ui.finetune_tab import TRAIN_HANDLERS

    train = next(fn for fn in app.fns.values() if fn.api_name == "train")
    # Train handlers only relay the training hub's events (the hub decides who trains together), so a
    # whole room can be waiting at once
    assert train.concurrency_limit == TRAIN_HANDLERS >= 30
