"""core.model.pipeline.thread_with_cores: one thread computes on n cores, every other thread keeps
the process's default (the app's policy: core.engine.Engine)."""

import threading
import time

import torch

from core.model.pipeline import thread_with_cores


def test_a_thread_with_cores_leaves_every_other_thread_its_default():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    seen = {}
    try:

        def worker():
            time.sleep(0.3)  # the caller has put the default back by now
            torch.randn(256, 256) @ torch.randn(256, 256)  # a parallel region
            seen["worker"] = torch.get_num_threads()

        thread_with_cores(worker, 2, "worker").join()
        later = threading.Thread(target=lambda: seen.setdefault("later", torch.get_num_threads()))
        later.start()
        later.join()
        seen["caller"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == {"worker": 2, "later": 1, "caller": 1}


def test_events_on_cores_pass_events_errors_and_a_stop_through():
    from core.model.pipeline import events_on_cores

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seen = []

        def job(stop):
            for i in range(3):
                seen.append((i, torch.get_num_threads(), threading.current_thread().name))
                yield i

        assert list(events_on_cores(job, 2)) == [0, 1, 2]
        assert all(n == 2 and name == "events-on-cores" for _, n, name in seen)
        assert torch.get_num_threads() == 1  # the caller keeps its own
        seen.clear()
        assert list(events_on_cores(job, 1)) == [0, 1, 2] and seen[0][2] == threading.current_thread().name

        def failing(stop):
            yield "started"
            raise ValueError("a sentence for the visitor")

        gen = events_on_cores(failing, 2)
        assert next(gen) == "started"
        try:
            next(gen)
            raise AssertionError("the job's error was not raised")
        except ValueError as e:
            assert "sentence" in str(e)

        stopped = threading.Event()

        def endless(stop):
            while not stop():
                yield "step"
            stopped.set()

        gen = events_on_cores(endless, 2)
        assert next(gen) == "step"
        gen.close()  # the visitor left: the job ends at its next check
        assert stopped.wait(10)
    finally:
        torch.set_num_threads(before)


def test_a_cloak_gets_every_core_only_while_no_fine_tune_runs_or_waits():
    """``Engine.free_cores``: the cores a visitor's cloak may take now."""
    from core.engine import Engine
    from core.finetune.hub import TrainingHub
    from core.model.pipeline import cores

    def hub(training, waiting):  # a hub's state alone (no model, no threads)
        h = TrainingHub.__new__(TrainingHub)
        h.lock = threading.Condition()
        h.visits, h.solos, h.waiting = {k: None for k in range(training)}, [], [None] * waiting
        return h

    engine = Engine.__new__(Engine)  # no model needed: only the hub's state counts
    engine._lock = threading.Lock()
    assert engine.free_cores() == cores()  # no hub started yet
    engine._hub = hub(0, 0)
    assert engine.free_cores() == cores()
    engine._hub = hub(1, 0)
    assert engine.free_cores() == 1
    engine._hub = hub(0, 2)
    assert engine.free_cores() == 1
