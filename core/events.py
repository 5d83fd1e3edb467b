"""Small frozen events that long jobs yield; the UI renders them, CLIs print them, tests drain them.

A long job is a generator ``job(config, should_stop=lambda: False) -> Iterator[Event]``. It checks
``should_stop()`` between steps and ends early (yielding ``Done(cancelled=True)``) when it is true.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Progress:
    """One step of a job: ``step`` of ``total`` in ``stage``, with optional scalar metrics."""

    stage: str
    step: int
    total: int
    elapsed: float
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Message:
    """A line of text worth showing (stage started, file written, ...)."""

    text: str


@dataclass(frozen=True)
class Done:
    """The job ended; ``result`` is whatever it produced (a path, a dataclass ...)."""

    result: Any = None
    cancelled: bool = False


def never() -> bool:
    return False


def stop_on_signals(signums=None):
    """A ``should_stop`` for a command-line job that turns true on SIGINT (Ctrl-C) or SIGTERM (a
    machine shutting down), so the job stops at its next check and saves what it has (a second
    Ctrl-C interrupts at once). Call from the main thread."""
    import signal
    import threading

    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        print(f"\n{signal.Signals(signum).name}: stopping at the next checkpoint of the job", flush=True)
        stop.set()

    for signum in signums or (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
    return stop.is_set


def run_with_progress_bar(events: Iterable[Event], stream=None) -> Any:
    """Drain a job's events in a terminal: a tqdm bar per stage, messages printed; returns Done.result."""
    from tqdm import tqdm

    bar, stage, result = None, None, None
    for ev in events:
        if isinstance(ev, Progress):
            if ev.stage != stage:
                if bar:
                    bar.close()
                bar, stage = tqdm(total=ev.total, desc=ev.stage, file=stream, initial=ev.step - 1), ev.stage
            bar.update(ev.step - bar.n)
            if ev.metrics:
                bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in ev.metrics.items()})
        elif isinstance(ev, Message):
            (bar.write if bar else print)(ev.text)
        elif isinstance(ev, Done):
            result = ev.result
            if ev.cancelled:
                (bar.write if bar else print)("cancelled")
    if bar:
        bar.close()
    return result


def drain(events: Iterator[Event], on_event: Callable[[Event], None] | None = None) -> Any:
    """Run a job to the end without a terminal; returns Done.result."""
    result = None
    for ev in events:
        if on_event:
            on_event(ev)
        if isinstance(ev, Done):
            result = ev.result
    return result


def result_of(step: Iterator[Event], on_event: Callable[[Event], None] | None = None) -> Any:
    """Run one step of a job to its end without a terminal: a generator of events that *returns* its
    value (``value = yield from step`` inside the job; no Done of its own). Returns that value."""
    while True:
        try:
            ev = next(step)
        except StopIteration as stop:
            return stop.value
        if on_event:
            on_event(ev)


@dataclass(frozen=True)
class Checkpoint:
    """A LoRA snapshot during a fine-tune: peft-named state dict (CPU tensors, in memory)."""

    step: int
    lora: dict


@dataclass(frozen=True)
class Preview:
    """Images drawn at ``step`` (e.g. the LoRA's own samples with the trigger); ``distance``: their
    identity distance to the subject's photos, where it was measured."""

    step: int
    images: list
    caption: str = ""
    distance: float | None = None


@dataclass(frozen=True)
class Reconstruction:
    """The attacker's images of the subject at checkpoint ``step``, from the LoRA weights alone, with
    their identity distance to the subject's photos and the floor (the base model's class-prompt
    samples, ``n_floor`` of them, at the same distance measure)."""

    step: int
    images: list
    distance: float
    floor: float
    n_floor: int


@dataclass(frozen=True)
class LayerChanges:
    """Per-layer change (:class:`core.layers.change.LayerChange` list) of the LoRA at ``step``."""

    step: int
    changes: list


Event = Progress | Message | Done | Checkpoint | Preview | Reconstruction | LayerChanges
