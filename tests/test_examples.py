"""core.model.examples as a job: candidates tried in seed order, a Progress each, a Message and a folder per
example person, a stop that ends it at once (the drawing itself stubbed: that is the base model's work)."""

import json

import numpy as np

from core.events import Done, Message, Progress
from core.model import examples as ex


def fake_person(pipe, seed, n=6, strength=0.45):
    """Every third candidate becomes a person (as dlib's checks keep only some)."""
    if seed % 3:
        return None
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(n)], np.linspace(0, 0.3, n)


def test_the_job_tries_candidates_until_it_has_its_people(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "make_person", fake_person)
    events = list(ex.make_examples(None, ex.Args(people=2, photos=3, first_seed=10), out=tmp_path))
    assert all(isinstance(ev, (Progress, Message, Done)) for ev in events)
    assert events[-1] == Done([tmp_path / "person_12", tmp_path / "person_15"], cancelled=False)
    assert [ev.step for ev in events if isinstance(ev, Progress)] == list(range(1, 7))  # seeds 10..15
    assert sum(isinstance(ev, Message) for ev in events) == 2
    about = json.loads((tmp_path / "person_15" / "about.json").read_text())
    assert about["base_seed"] == 15 and about["photos"] == 3 and len(list((tmp_path / "person_15").glob("*.png"))) == 3


def test_a_stop_after_the_first_candidate_ends_the_job(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "make_person", fake_person)
    events = []
    stop = lambda: any(isinstance(ev, Progress) for ev in events)
    for ev in ex.make_examples(None, ex.Args(people=2, first_seed=12), out=tmp_path, should_stop=stop):
        events.append(ev)
    assert sum(isinstance(ev, Progress) for ev in events) == 1
    assert events[-1] == Done([tmp_path / "person_12"], cancelled=True)
