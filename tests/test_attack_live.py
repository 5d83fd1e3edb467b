"""The shipped attacker on the shipped base: reconstructions of a live fine-tune get closer to the
photos as the LoRA learns (a fixed small case: the first example face, 5 photos, seed 0)."""

from pathlib import Path

from core import ASSETS
from core.attack.attacker import reconstruct
from core.events import Checkpoint
from core.faces.ingest import ingest_face
from core.faces.utility import identity_distance
from core.finetune.lora import FinetuneConfig, finetune


def test_reconstruction_improves_over_a_live_finetune(base_engine):
    attacker, why = base_engine.attacker()
    assert attacker is not None, why
    pipe = base_engine.pipe
    paths = sorted((ASSETS / "examples" / "person_1000").glob("*.png"))[:5]
    photos = [ingest_face(Path(p).read_bytes(), size=base_engine.image_size).crop for p in paths]
    cfg = FinetuneConfig(seed=0, checkpoint_every=10, preview_n=0)
    checkpoints = [ev for ev in finetune(pipe, photos, cfg) if isinstance(ev, Checkpoint)]
    first, last = checkpoints[0], checkpoints[-1]
    assert (first.step, last.step) == (10, cfg.steps)
    d_first = identity_distance(reconstruct(pipe, attacker, first.lora, first.step)[0], photos)
    d_last = identity_distance(reconstruct(pipe, attacker, last.lora, last.step)[0], photos)
    assert d_last < d_first, (d_first, d_last)
