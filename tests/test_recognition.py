"""core.faces.recognition's worker process: the same descriptors as in this process, replaced when it
dies, gone when turned off."""

import numpy as np
import pytest

from core.faces import recognition
from tests.test_cloak import face_like


@pytest.fixture
def worker():
    recognition.describe_in_worker()
    yield recognition._worker
    recognition.describe_in_worker(False)


def test_the_worker_describes_as_this_process_does(worker):
    images = face_like(3, 64)
    recognition.describe_in_worker(False)
    here = recognition.describe(images)
    recognition.describe_in_worker()
    there = recognition.describe(images)
    assert worker.proc is not None and worker.proc.poll() is None  # computed in a child process
    assert np.array_equal(here, there)
    assert recognition.describe([]).shape == (0, 128)


def test_a_dead_worker_is_replaced_and_turning_it_off_ends_it(worker):
    images = face_like(2, 64)
    first = recognition.describe(images)
    old = worker.proc
    old.kill()
    old.wait()
    assert np.array_equal(recognition.describe(images), first)  # the failed call was answered here
    assert worker.wanted
    assert np.array_equal(recognition.describe(images), first)
    assert worker.proc is not None and worker.proc is not old
    child = worker.proc
    recognition.describe_in_worker(False)
    assert child.poll() is not None and worker.proc is None
