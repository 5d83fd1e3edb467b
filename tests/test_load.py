"""Load, through gradio_client on the app built on the tiny random pipeline: 8 visitors start a short
fine-tune at the same moment; they wait in line (told their place), all finish, and the app answers
afterwards; 20 simultaneous requests all get served, none refused."""

import threading
import time

import pytest

from tests.bad_inputs import private_photos
from tests.conftest import launched_app

VISITORS = 8


@pytest.fixture(scope="module")
def app(tiny_engine):
    yield from launched_app(tiny_engine)


def clients(url, n):
    from gradio_client import Client

    return [Client(url, verbose=False, download_files=False) for _ in range(n)]


def watch(jobs, seen, stop):
    """Record every (status code, place in line, estimate) each job reports until ``stop`` is set."""
    while not stop.is_set():
        for i, job in enumerate(jobs):
            st = job.status()
            seen.append((i, st.code.name, st.rank, st.eta))
        time.sleep(0.05)


def test_eight_visitors_fine_tune_at_once(app, tmp_path):
    from gradio_client import handle_file

    cs = clients(app.local_url, VISITORS)
    try:
        ingests = [c.submit([handle_file(str(p)) for p in private_photos(tmp_path, i, tag=f"v{i}")], api_name="/ingest")
                   for i, c in enumerate(cs)]
        assert all("3 usable photos" in job.result(timeout=120)[1] for job in ingests)
        t0 = time.monotonic()
        jobs = [c.submit(20, 4, 3e-3, i, False, api_name="/train") for i, c in enumerate(cs)]
        seen, stop = [], threading.Event()
        watcher = threading.Thread(target=watch, args=(jobs, seen, stop), daemon=True)
        watcher.start()
        results = [job.result(timeout=300) for job in jobs]
        stop.set()
        watcher.join(5)
        took = time.monotonic() - t0
        for status, *_ in results:
            assert "Done: 20 steps" in status
        # the fine-tune runs one at a time: the others were told their place in line
        waiting = [(i, rank) for i, code, rank, eta in seen if code == "IN_QUEUE" and rank is not None and rank >= 1]
        assert waiting, f"no job reported a place in line ({len(seen)} statuses)"
        print(f"{VISITORS} fine-tunes of 20 steps in {took:.1f} s; deepest place in line {max(r for _, r in waiting)}")
    finally:
        for c in cs:
            c.close()
    assert len(clients(app.local_url, 1)[0].predict(0, 1, 5, 1.0, api_name="/sample")) == 1  # still answering


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
    train = next(fn for fn in app.fns.values() if fn.api_name == "train")
    assert train.concurrency_limit == 1  # fine-tunes share the CPU one at a time
