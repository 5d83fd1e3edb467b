"""A room of visitors pressing Train: one worker that trains them together and streams each their own events.

:class:`TrainingHub` runs one worker thread over the shared base pipeline. A visitor's
:meth:`TrainingHub.submit` is a generator of that visitor's events only (the same events as
:func:`core.finetune.live.live_finetune`, plus :class:`Queued` while waiting and :class:`Training`
saying with how many others). The worker, in rounds:

1. admits waiting visitors: a recipe that fits the running :class:`core.finetune.batch.LoRABatch`
   joins it at the next step (continuous batching, up to ``max_batch`` runs); DP-SGD and
   text-encoder LoRAs train alone (per-photo gradients and a second adapted model do not stack),
   interleaved step by step with the batch; a visitor whose photos fail never enters;
2. one optimisation step for every run of the batch (one stacked forward), one step of each solo job;
3. the runs at a checkpoint get their live work together (:mod:`core.finetune.live_batch`: layer
   changes, then one sampler loop for all reconstructions and one for all previews, each event sent
   as soon as it is ready); a finished run leaves the batch and is scored from its last previews;
4. a cancelled or disconnected visitor leaves at the next step without disturbing the others.
The live work of step 3 runs in a second thread while the next steps train (``live_thread``;
off, it runs between steps): a run's reconstruction at step 20 is drawn while steps 21.. train; with
nobody left to train, the trainer draws waiting checkpoints beside it (a room's last checkpoints
were drawn on one core while the other idled). A visitor's photos are encoded before they queue, in
a thread of the hub's own. The cores are split between the two threads, each its own
(:func:`core.model.pipeline.thread_with_cores`); the rest of the process computes on one. dlib's
descriptors are computed in a process of their own (``face_worker``,
:func:`core.faces.recognition.describe_in_worker`): dlib holds the GIL through each call, and the
trainer's steps waited for it. On the 2-core CPU one visitor of the 128 px base is done
in 20.6-23.6 s through the app (``python -m bench.workshop --visitors 1 --sequential False``).
With one visitor it starts at once. ``gather_seconds`` > 0 lets an idle hub wait that long for more
visitors before the first step. How many train at once (``max_batch``) and the wait are
:class:`HubConfig` fields, set by the hardware by default (CPU: 8, GPU: 32).
"""

from __future__ import annotations

import collections
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from core.events import Done, Message, Preview, Progress, never
from core.finetune.live import LiveConfig, LiveResult, shared_lora
from core.model.pipeline import cores, thread_with_cores


@dataclass
class HubConfig:
    max_batch: int = 0  # visitors trained in one batch (0 = by hardware: 8 on a CPU, 32 on a GPU)
    gather_seconds: float = 0.0  # an idle hub waits this long for more visitors before starting (0 = at once)
    live_thread: bool = True  # draw checkpoints in a second thread while the next steps train (False: between steps)
    compile: bool = False  # compile the default recipe's stacked step once, in the background (bench/compile_once.py)
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager" in tests: no code generation)
    split_last: bool = True  # a visitor alone: their last previews drawn beside their last reconstruction
    face_worker: bool = True  # dlib's descriptors in a process of its own (core.faces.recognition), off the GIL

    def __post_init__(self):
        if self.max_batch < 0 or self.gather_seconds < 0:
            raise ValueError(
                f"max_batch and gather_seconds must be >= 0, got {self.max_batch!r}, {self.gather_seconds!r}"
            )

    def batch_size(self, device) -> int:
        return self.max_batch or (32 if str(device).startswith("cuda") else 8)


@dataclass(frozen=True)
class Queued:
    """A visitor waits: ``position`` 1 = next to start; ``estimate_seconds``: until they start (None: unknown)."""

    position: int
    training: int  # visitors training now
    estimate_seconds: float | None


@dataclass(frozen=True)
class Training:
    """A visitor's fine-tune is running: with ``others`` other visitors in the same stacked batch, or
    alone because of ``alone_because``."""

    others: int
    alone_because: str = ""


class Failed(Exception):
    """A visitor's run could not be done; ``str`` is a sentence for the visitor."""


@dataclass(eq=False)  # a ticket is one visit: compared by identity, never by its photos
class Ticket:
    photos: list  # the visitor's photos: every identity score compares with these
    train_photos: list  # what the LoRA trains on (the photos, or their protected versions)
    cfg: LiveConfig
    should_stop: object = never
    events: queue.Queue = field(default_factory=queue.Queue)
    left: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    latents: object = None  # its training photos' latents, encoded before it queues (batched runs)

    def stopped(self) -> bool:
        return self.left.is_set() or bool(self.should_stop())


@dataclass(eq=False)
class LiveJob:
    """A checkpoint handed from the trainer to the live worker."""

    ticket: Ticket
    due: object  # core.finetune.live_batch.Due
    result: object = None  # a finished run's FinetuneResult (the LoRA as shared); None at other checkpoints
    raw: dict | None = None  # a finished run's LoRA before the defense


def release_memory() -> None:
    """Give the memory freed by the last runs back to the system when the hub falls idle: glibc's
    allocator keeps the peak of a batch's steps (activations grow with the batch) otherwise, and a
    room of visitors would leave the process that much bigger (``python -m bench.workshop``)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def as_sentence(error: Exception) -> str:
    """An error's message as a sentence for the visitor (capital first letter, full stop)."""
    text = str(error)
    return f"{text[:1].upper()}{text[1:]}."


def alone_reason(cfg: LiveConfig) -> str:
    if cfg.dp_noise is not None:
        return "DP-SGD computes a gradient per photo, so it trains alone"
    if cfg.finetune.text_encoder:
        return "a text-encoder LoRA adapts a second model, so it trains alone"
    return ""


class TrainingHub:
    """See the module docstring. ``attacker``: the trained attacker for this base or None;
    ``floor_images``: the base model's class-prompt samples (the floor of every identity score)."""

    def __init__(self, pipe, attacker=None, floor_images=None, cfg: HubConfig | None = None, default_recipe=None):
        from core.faces.recognition import describe_in_worker
        from core.faces.utility import describe_set
        from core.faces.utility import floor_images as make_floor

        self.pipe, self.attacker, self.cfg = pipe, attacker, cfg or HubConfig()
        self.default_recipe = default_recipe or LiveConfig().finetune  # the recipe compiled and kept
        if self.cfg.face_worker:
            describe_in_worker()
        self.floor = floor_images if floor_images is not None else make_floor(pipe)
        self.floor_descriptor = describe_set(self.floor)
        self.max_batch = self.cfg.batch_size(pipe.device)
        self.waiting: list[Ticket] = []
        self.batch = None  # the running LoRABatch
        self.visits: dict = {}  # Run -> (Ticket, Visit)
        self.solos: list = []  # (Ticket, generator) of runs that train alone
        self.round_seconds = None  # moving average of one round (all runs one step)
        self.lock = threading.Condition()
        # checkpoints waiting for their images, in the order their steps ended, and the visits whose
        # checkpoint is being drawn (a visit's checkpoints are drawn one after another, in order)
        self.live_todo: collections.deque = collections.deque()
        self.live_busy: set = set()
        self.live_cv = threading.Condition()
        self.sampler = None  # the trainer's own live_batch.Sampler (no live thread, or helping it)
        self.helped = 0  # checkpoints the trainer drew for the live thread (_help_live)
        self.stacks: dict = {}  # the default recipe's batch.AdapterStack, kept across batches
        live_cores = max(1, cores() // 2) if self.cfg.live_thread else 0
        self.thread = thread_with_cores(self._work, max(1, cores() - live_cores), "training-hub")
        if live_cores:
            self.live_thread = thread_with_cores(self._live, live_cores, "training-hub-live")
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="training-hub-encode")  # see _encode
        self.compile_thread = None
        if self.cfg.compile:
            self.compile_thread = threading.Thread(
                target=self._compile_default, name="training-hub-compile", daemon=True
            )
            self.compile_thread.start()

    def stack(self, cfg):
        """The adapter stack of recipe ``cfg``: the default recipe's is kept (and compiled) for every
        batch of it; another recipe's is made for its batch and freed with it (a room trying many
        settings would otherwise keep a UNet copy per setting)."""
        from core.finetune.batch import SHARED_FIELDS, AdapterStack

        key = tuple(getattr(cfg, f) for f in SHARED_FIELDS)
        if key != tuple(getattr(self.default_recipe, f) for f in SHARED_FIELDS):
            return AdapterStack(self.pipe, replace(cfg, seed=0, trigger=None))
        with self.lock:
            if key not in self.stacks:
                self.stacks[key] = AdapterStack(self.pipe, replace(cfg, seed=0, trigger=None))
            return self.stacks[key]

    def _compile_default(self) -> None:
        """Compile the default recipe's stacked step on the floor faces (photos the base model drew),
        while visitors train eagerly; the result is in :meth:`status`."""
        st = self.stack(self.default_recipe)
        photos = (list(self.floor) * 3)[:5]  # a fine-tune takes 3 to 10 photos
        if st.compile(photos, self.cfg.compile_backend):
            graphs = " (replayed as CUDA graphs)" if st.compile_mode == "reduce-overhead" else ""
            said = f"fine-tune step compiled in {st.compile_seconds:.0f} s{graphs}"
        else:
            said = f"compiling failed, training uncompiled ({st.compile_error})"
        print(f"training hub: {said}", file=sys.stderr, flush=True)

    # the visitor's side ---------------------------------------------------------------------------

    def submit(self, photos, cfg: LiveConfig, should_stop=never, train_photos=None):
        """Generator of this visitor's events, ending with ``Done(LiveResult)`` (or ``Done(None,
        cancelled=True)``); raises :class:`Failed` with a sentence when the run cannot be done.
        ``train_photos``: what to train on when it is not ``photos`` (e.g. cloaked photos; scores still
        compare with ``photos``). Closing the generator (Stop, or the visitor left) takes the run out."""
        ticket = Ticket(list(photos), list(train_photos if train_photos is not None else photos), cfg, should_stop)
        if not alone_reason(cfg):
            ticket.latents = self.encoder.submit(self._encode, ticket.train_photos).result()
        with self.lock:
            self.waiting.append(ticket)
            self.lock.notify_all()
        try:
            while True:
                ev = ticket.events.get()
                if isinstance(ev, Failed):
                    raise ev
                yield ev
                if isinstance(ev, Done):
                    return
        finally:
            ticket.left.set()

    def _encode(self, photos):
        """The training photos' latents, computed in the hub's encoder thread while the batch trains on
        (in the trainer's thread each newcomer stalled every run of the batch for ~1 s at 128 px). One
        thread for every visitor rather than each visitor's own handler thread: after a room whose
        visitors' photos were encoded in their handler threads the app kept 17 % more memory
        (``docs/results/bench_workshop_30_128.txt``)."""
        from core.finetune.lora import check_photos, encode_photos

        try:
            return encode_photos(self.pipe, check_photos(photos))
        except (ValueError, OSError) as e:
            raise Failed(as_sentence(e)) from None

    def status(self) -> dict:
        with self.lock:
            return {
                "training": len(self.visits) + len(self.solos),
                "waiting": len(self.waiting),
                "max_batch": self.max_batch,
                "round_seconds": self.round_seconds,
                "compiled": self.compile_state(),
            }

    def idle(self) -> bool:
        """No visitor is training or waiting: the trainer's cores are free."""
        with self.lock:
            return not (self.visits or self.solos or self.waiting)

    @property
    def compiling(self) -> bool:
        """True while the background compile runs (native code that cannot be interrupted)."""
        return self.compile_thread is not None and self.compile_thread.is_alive()

    def compile_state(self) -> str:
        """ "off", "compiling", "ready" or "failed: <why>" (the default recipe's compiled step)."""
        if not self.cfg.compile:
            return "off"
        st = self.stack(self.default_recipe)
        if st.compiled is not None:
            return "ready"
        return f"failed: {st.compile_error}" if st.compile_error else "compiling"

    # the worker ----------------------------------------------------------------------------------

    def _work(self):
        from core.finetune.live_batch import Sampler, merge_each

        if self.cfg.live_thread and merge_each(self.pipe.device):
            self.sampler = Sampler(self.pipe)  # its scratch UNet now, not when it first helps (_help_live)
            try:
                self.sampler.prepare()
            except Exception:  # e.g. out of memory: allocated when it first helps instead
                import traceback

                traceback.print_exc()
        while True:
            try:
                self._work_once()
            except Exception as e:  # never let the worker die: fail what was queued or running, serve on
                import traceback

                traceback.print_exc()
                self._fail_everything(f"The training failed ({type(e).__name__}); please press Train again.")

    def _fail_everything(self, sentence: str) -> None:
        with self.lock:
            tickets = [t for t, _ in self.visits.values()] + [t for t, _ in self.solos] + self.waiting
            self.visits, self.solos, self.waiting, self.batch = {}, [], [], None
        for ticket in tickets:
            ticket.events.put(Failed(sentence))

    def _work_once(self):
        """One round: admit, step, live work, finish (see the module docstring). With nobody to train,
        the trainer draws checkpoints waiting for the live thread (:meth:`_help_live`)."""
        while self.idle() and self._help_live():
            pass
        with self.lock:
            if self.idle():
                if not self.live_pending():
                    release_memory()
                self.lock.wait()  # a visitor arrives, or a visit's next checkpoint may be drawn
                if self.idle():
                    return
            if not (self.visits or self.solos) and self.cfg.gather_seconds:
                self.lock.wait(self.cfg.gather_seconds)
            admit = self._admissions()
        t0 = time.perf_counter()
        for ticket in admit:
            self._start(ticket)
        self._round()
        dt = time.perf_counter() - t0
        self.round_seconds = dt if self.round_seconds is None else 0.8 * self.round_seconds + 0.2 * dt
        self._tell_waiting()

    def _admissions(self) -> list[Ticket]:
        """Waiting visitors that start now (called with the lock held)."""
        live = [t for t in self.waiting if not t.stopped()]
        for t in self.waiting:
            if t.stopped():
                t.events.put(Done(None, cancelled=True))
        room = self.max_batch - len(self.visits) - len(self.solos)
        admit = []
        for t in live:
            if room <= 0:
                break
            if alone_reason(t.cfg) or self.batch is None or self.batch.accepts(t.cfg.finetune) or not self.visits:
                admit.append(t)
                room -= 1
        self.waiting = [t for t in live if t not in admit]
        return admit

    def _start(self, ticket: Ticket) -> None:
        from core.finetune.batch import LoRABatch
        from core.finetune.live import live_finetune
        from core.finetune.live_batch import Visit
        from core.finetune.lora import pick_trigger

        cfg = ticket.cfg
        if cfg.finetune.trigger is None:
            cfg = replace(cfg, finetune=replace(cfg.finetune, trigger=pick_trigger(cfg.finetune)))
            ticket.cfg = cfg
        why = alone_reason(cfg)
        try:
            if why:
                gen = live_finetune(
                    self.pipe,
                    ticket.photos,
                    cfg,
                    self.attacker,
                    self.floor,
                    should_stop=ticket.stopped,
                    train_photos=ticket.train_photos,
                )
                self.solos.append((ticket, gen))
                ticket.events.put(Training(0, why))
                return
            if self.batch is None or not self.visits:
                recipe = replace(cfg.finetune, seed=0, trigger=None)
                self.batch = LoRABatch(self.pipe, recipe, self.stack(recipe).forward)
            run = self.batch.add(ticket, ticket.train_photos, cfg.finetune, latents=ticket.latents)
        except (ValueError, OSError) as e:
            ticket.events.put(Failed(as_sentence(e)))
            return
        visit = Visit(list(ticket.photos), replace(cfg, finetune=run.cfg), self.floor_descriptor)
        if self.cfg.face_worker:
            visit.describe_soon()  # waits on the face worker beside the first steps
        self.visits[run] = (ticket, visit)
        ticket.events.put(Message(f"trigger word: {run.trigger}"))
        self._tell_training()

    def _tell_training(self) -> None:
        n = len(self.visits)
        for ticket, _ in self.visits.values():
            ticket.events.put(Training(n - 1))

    def _tell_waiting(self) -> None:
        with self.lock:
            waiting = list(self.waiting)
            training = len(self.visits) + len(self.solos)
        est = self.estimate_start()
        for i, t in enumerate(waiting):
            t.events.put(Queued(i + 1, training, est))

    def estimate_start(self) -> float | None:
        """Seconds until a place frees up: the run with the fewest steps left, at the current round time."""
        left = [r.cfg.steps - r.step for r in self.visits]
        if not left or self.round_seconds is None:
            return None
        return min(left) * self.round_seconds

    def _round(self) -> None:
        self._drop_leavers()
        if self.batch is not None and self.visits:
            try:
                runs = self.batch.step()
            except Exception as e:  # a crash of the shared step fails every run in it, not the app
                for run in list(self.visits):
                    self._fail(run, f"The training step failed ({type(e).__name__}); please press Train again.")
                return
            self._after_step(runs)
        for ticket, gen in list(self.solos):
            self._advance_solo(ticket, gen)

    def _drop_leavers(self) -> None:
        for run, (ticket, _) in list(self.visits.items()):
            if ticket.stopped():
                self.batch.remove(run)
                del self.visits[run]
                ticket.events.put(Done(None, cancelled=True))
                self._tell_training()

    def _fail(self, run, sentence: str) -> None:
        ticket, _ = self.visits.pop(run)
        self.batch.remove(run)
        ticket.events.put(Failed(sentence))

    def _after_step(self, runs) -> None:
        """Progress for every run; the runs at a checkpoint get their layer changes now and go to the
        live worker (:meth:`_live`) for their images; finished runs leave the batch."""
        from core.finetune.live_batch import Due, layer_changes

        jobs = []
        for run in runs:
            ticket, v = self.visits[run]
            loss, inst = run.losses[-1]
            ticket.events.put(
                Progress(
                    "fine-tune",
                    run.step,
                    run.cfg.steps,
                    time.perf_counter() - run.t0,
                    {"loss": loss, "instance_loss": inst},
                )
            )
            every = run.cfg.checkpoint_every
            if run.done or (every and run.step % every == 0):
                raw = run.lora()
                job = LiveJob(ticket, Due(v, run.step, shared_lora(raw, ticket.cfg), run.done))
                if run.done:
                    job.result, job.raw = self._result(run, job.due.lora), raw
                    self.visits.pop(run)
                    self.batch.remove(run)
                jobs.append(job)
        if not jobs:
            return
        try:
            changes = layer_changes(self.pipe, [j.due for j in jobs])
        except Exception as e:
            return self._fail_jobs(jobs, e)
        for job, ev in zip(jobs, changes):
            job.ticket.events.put(ev)
        if self.cfg.live_thread:
            with self.live_cv:
                self.live_todo.extend(jobs)
                self.live_cv.notify_all()
        else:
            self._draw_now(jobs)
        if any(j.result is not None for j in jobs):
            self._tell_training()

    def _draw_now(self, jobs: list[LiveJob]) -> None:
        """The live work in the trainer's thread: before the next step, or helping the live thread."""
        from core.finetune.live_batch import Sampler

        self.sampler = self.sampler or Sampler(self.pipe)
        try:
            self._draw(self.sampler, jobs)
        except Exception as e:
            self._fail_jobs(jobs, e)

    def _result(self, run, lora: dict):
        from core.finetune.lora import FinetuneResult
        from core.model.prior import base_fingerprint

        return FinetuneResult(
            lora,
            run.trigger,
            run.cfg,
            base_fingerprint(self.pipe),
            [loss for loss, _ in run.losses],
            time.perf_counter() - run.t0,
            run.step,
        )

    @staticmethod
    def _fail_jobs(jobs: list[LiveJob], error: Exception) -> None:
        """Fail these visitors' live work (the error's trace goes to the log, a sentence to them); a run
        still in the batch leaves it at the trainer's next round."""
        import traceback

        traceback.print_exception(error)
        sentence = f"The live work at a checkpoint failed ({type(error).__name__}); please press Train again."
        for job in jobs:
            job.ticket.events.put(Failed(sentence))
            job.ticket.left.set()

    # the live worker -----------------------------------------------------------------------------

    def live_pending(self) -> bool:
        """Checkpoints are waiting for or being drawn."""
        with self.live_cv:
            return bool(self.live_todo or self.live_busy)

    def _take_live(self) -> list[LiveJob]:
        """The next checkpoints to draw (called with ``live_cv`` held): on a CPU the oldest one whose
        visit has no checkpoint being drawn (one merged LoRA at a time), on a GPU every such checkpoint
        due so far (one stacked sampler loop for all). Their visits are marked busy until
        :meth:`_live_done`; checkpoints of visitors who left are dropped."""
        from core.finetune.live_batch import merge_each

        jobs, seen = [], set()
        for job in list(self.live_todo):
            if self._left(job):
                self.live_todo.remove(job)
                continue
            if job.ticket in self.live_busy or job.ticket in seen:
                seen.add(job.ticket)  # its earlier checkpoint comes first
                continue
            seen.add(job.ticket)
            jobs.append(job)
            if merge_each(self.pipe.device):
                break
        for job in jobs:
            self.live_todo.remove(job)
            self.live_busy.add(job.ticket)
        return jobs

    def _live_done(self, jobs: list[LiveJob]) -> None:
        with self.live_cv:
            self.live_busy.difference_update(j.ticket for j in jobs)
            self.live_cv.notify_all()
        with self.lock:
            self.lock.notify_all()  # an idle trainer may help with the visit's next checkpoint

    def _help_live(self) -> bool:
        """With nobody to train, draw one waiting checkpoint in the trainer's thread, on its own core
        and scratch UNet, beside the live thread: at the end of a room the checkpoints queued for the
        live thread were drawn on one core while the trainer's idled. Returns whether it drew one. A
        visitor who arrives meanwhile starts when that checkpoint is drawn (a few seconds). CPU only
        (on a GPU both threads would queue on one device)."""
        from core.finetune.live_batch import merge_each

        if not self.cfg.live_thread or not merge_each(self.pipe.device):
            return False
        with self.live_cv:
            jobs = self._take_live()
        if not jobs:
            return False
        try:
            self.helped += len(jobs)
            self._draw_now(jobs)
        finally:
            self._live_done(jobs)
        return True

    def _live(self):
        """The live worker: draws and scores checkpoints while the trainer goes on (:meth:`_take_live`)."""
        from core.finetune.live_batch import Sampler

        sampler = Sampler(self.pipe)
        helper = Sampler(self.pipe)  # a second scratch UNet for _alone's previews
        # the scratch UNets now, not on a visitor's clock (a visitor's last previews waited ~1 s for
        # the helper's first copy)
        try:
            sampler.prepare()
            if self.cfg.split_last:
                helper.prepare()
        except Exception:  # e.g. out of memory: they are allocated at the first checkpoint instead
            import traceback

            traceback.print_exc()
        while True:
            with self.live_cv:
                while not (jobs := self._take_live()):
                    self.live_cv.wait()
            try:
                self._draw(sampler, jobs, helper if self._alone(jobs) else None)
            except Exception as e:  # never let the worker die: fail these visitors, serve on
                self._fail_jobs(jobs, e)
            finally:
                self._live_done(jobs)

    def _alone(self, jobs: list[LiveJob]) -> bool:
        """Is this the last checkpoint of a run that has finished training, with no one training or
        waiting? Then the trainer's cores idle, and the checkpoint's previews (the score's samples) are
        drawn in a thread of their own beside its reconstruction (:func:`checkpoint_images`'s
        ``helper``): a visitor alone gets their result sooner (``python -m bench.live_work``)."""
        if not (self.cfg.split_last and len(jobs) == 1 and jobs[0].result is not None and self.idle()):
            return False
        with self.live_cv:  # else the idle trainer draws the others beside it (_help_live)
            return not self.live_todo and self.live_busy == {jobs[0].ticket}

    @staticmethod
    def _left(job: LiveJob) -> bool:
        if job.ticket.stopped():
            if job.result is not None:  # it finished training but left before its score
                job.ticket.events.put(Done(None, cancelled=True))
            return True
        return False

    def _draw(self, sampler, jobs: list[LiveJob], helper=None) -> None:
        from core.finetune.live_batch import checkpoint_images

        due = [j.due for j in jobs]
        for k, ev in checkpoint_images(sampler, self.attacker, due, len(self.floor), helper=helper):
            jobs[k].ticket.events.put(ev)
            if isinstance(ev, Preview) and jobs[k].result is not None:  # a finished run's last event
                self._finish(jobs[k], ev)

    def _finish(self, job: LiveJob, last_preview) -> None:
        from core.finetune.live_batch import final_utility

        ticket, v, res = job.ticket, job.due.visit, job.result
        ticket.events.put(Message("scoring the LoRA against the photos"))
        u = final_utility(last_preview, v)
        before = None
        if ticket.cfg.defense:
            from core.faces.utility import lora_utility

            before = lora_utility(self.pipe, job.raw, res.trigger, v.photos, alpha=res.config.alpha, floor=self.floor)
        ticket.events.put(Done(LiveResult(res, job.raw, u, before)))

    def _advance_solo(self, ticket: Ticket, gen) -> None:
        """Forward a solo run's events up to and including its next optimisation step."""
        try:
            for ev in gen:
                ticket.events.put(ev)
                if isinstance(ev, Done):
                    break
                if isinstance(ev, Progress):
                    return
        except (ValueError, OSError) as e:
            ticket.events.put(Failed(as_sentence(e)))
        self.solos = [(t, g) for t, g in self.solos if t is not ticket]
