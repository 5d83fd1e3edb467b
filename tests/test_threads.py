"""core.model.pipeline.thread_with_cores: one thread computes on n cores, every other thread keeps
the process's default (the app's policy: core.engine.Engine)."""

import threading

import torch

from core.model.pipeline import thread_with_cores


def test_a_thread_with_cores_leaves_every_other_thread_its_default():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    seen = {}
    try:
        thread_with_cores(lambda: seen.setdefault("worker", torch.get_num_threads()), 2, "worker").join()
        later = threading.Thread(target=lambda: seen.setdefault("later", torch.get_num_threads()))
        later.start()
        later.join()
        seen["caller"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == {"worker": 2, "later": 1, "caller": 1}
