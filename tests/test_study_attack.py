"""core.studies.attack as a job on the tiny pipeline: the victims' LoRAs trained once (cached), every
method's rows, a Progress per victim, a stop that keeps the victims measured, and the command's report
in the format of docs/results/attack.json."""

import json

import pytest

from core import RESULTS
from core.events import Done, Progress, drain, result_of
from core.studies import attack as sa

CFG = sa.AttackStudyConfig(n=2, no_baselines=True, attack_steps=2)


@pytest.fixture(scope="module")
def attacker_file(tiny_pipe, tiny_pipeline_dir, lfw_root, tmp_path_factory):
    """The victims' LoRAs (trained by the prepare job), and an untrained attacker for the tiny base saved
    like the shipped one."""
    from core.attack.attacker import Attacker, config_for, save_attacker
    from core.finetune.lora import encode_prompt
    from core.model.prompts import CLASS_PROMPT

    assert drain(sa.prepare(CFG, str(tiny_pipeline_dir))) == 2
    names, people = sa.identities("victims", 2)
    recipe = sa.victim_recipe()
    loras = result_of(sa.train_victim_loras(tiny_pipe, names, sa.crops_of(names, people, 64), recipe))
    cfg = config_for(tiny_pipe, loras[0]["checkpoints"][recipe.steps], rank=recipe.rank, alpha=recipe.alpha)
    model = Attacker(cfg, class_embedding=encode_prompt(tiny_pipe, CLASS_PROMPT)[0])
    return save_attacker(model, tmp_path_factory.mktemp("attacker") / "attacker.safetensors")


def test_prepared_loras_are_reused(tiny_pipeline_dir, attacker_file):
    events = list(sa.prepare(CFG, str(tiny_pipeline_dir)))
    assert not [e for e in events if isinstance(e, Progress)]  # nothing left to train
    assert events[-1] == Done(2)


def test_command_writes_every_row_in_the_reports_format(tiny_pipeline_dir, attacker_file, tmp_path):
    sa.main(
        [
            "--model",
            str(tiny_pipeline_dir),
            "--n",
            "2",
            "--no-baselines",
            "--attack-steps",
            "2",
            "--extrapolate",
            "3",
            "--attacker",
            f"mine={attacker_file}",
            "--out",
            str(tmp_path),
            "--name",
            "t",
        ]
    )
    doc = json.loads((tmp_path / "t.json").read_text())
    shipped = RESULTS / "attack.json"
    if shipped.exists():
        assert list(doc) == list(json.loads(shipped.read_text()))
    assert doc["command"].startswith("python -m core.studies.attack --model") and "--no-baselines" in doc["command"]
    assert doc["n"] == 2 and doc["attack_sampling"]["sampler_steps"] == 2
    assert doc["attackers"] == {"mine": str(attacker_file)}
    methods = {
        "mine",
        "mine @ step 25",
        "mine @ step 50",
        "mine: prompt only (w=1)",
        "mine, w=3",
        "floor (base, class prompt)",
    }
    assert set(doc["rows"]) - {"real (held-out photo)"} == methods  # the real row: victims with a held-out photo
    assert all(len(doc["rows"][m]["per_victim_distance"]) == 2 for m in methods)
    assert "| mine |" in (tmp_path / "t.md").read_text()


def test_progress_per_victim_and_a_stop_keeps_the_victims_measured(tiny_pipeline_dir, attacker_file):
    calls = []
    events = list(
        sa.run(
            CFG,
            {"attacker": str(attacker_file)},
            str(tiny_pipeline_dir),
            should_stop=lambda: calls.append(1) or len(calls) > 1,
        )
    )
    assert [(e.stage, e.step, e.total) for e in events if isinstance(e, Progress)] == [("attack", 1, 2)]
    done = events[-1]
    assert isinstance(done, Done) and done.cancelled and done.result.n == 1
    assert all(len(r["per_victim_distance"]) == 1 for r in done.result.rows.values())  # ranked among the 1 measured


def test_config_checks_its_values():
    with pytest.raises(ValueError, match="'people'"):
        sa.AttackStudyConfig(group="people")
    with pytest.raises(ValueError, match="attack_steps"):
        sa.AttackStudyConfig(attack_steps=0)
