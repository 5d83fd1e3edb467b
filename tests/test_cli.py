"""core.cli: every study command recorded in the README and in docs/results still parses (same flags,
same meaning), and a Switch works alone or with a value."""

import importlib
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.cli import Switch, parse

ROOT = Path(__file__).resolve().parent.parent


def recorded_commands() -> list[str]:
    """Every ``python -m core.studies.<name> ...`` quoted in the README and docs, or recorded in a result."""
    found = set()
    for f in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        found |= {" ".join(c.split()) for c in re.findall(r"`(python -m core\.studies\.[^`]+)`", f.read_text(), re.S)}
    for f in (ROOT / "docs" / "results").glob("*.json"):
        doc = json.loads(f.read_text())
        if isinstance(doc, dict) and str(doc.get("command", "")).startswith("python -m core.studies."):
            found.add(doc["command"])
    return sorted(found)


@pytest.mark.parametrize("command", recorded_commands())
def test_recorded_study_commands_still_parse(command):
    words = shlex.split(command)
    args = parse(importlib.import_module(words[2]).Args, words[3:])
    for flag, value in zip(words[3:], words[4:] + [""]):  # each "--flag value" given reached its field
        if flag.startswith("--") and value and not value.startswith("--"):
            got = getattr(args, flag[2:].replace("-", "_"))
            assert str(value) in {str(got), str(got).lower()} or isinstance(got, tuple), (flag, value, got)


def test_the_recorded_flags_mean_what_they_meant():
    from core.studies import attack, defenses, layers, watermark

    a = parse(attack.Args, shlex.split("--no-baselines --attacker 'a b=c.safetensors' 'd=e' --extrapolate 1.5 3"))
    assert a.no_baselines and a.attacker == ("a b=c.safetensors", "d=e") and a.extrapolate == (1.5, 3.0) and a.n == 50
    d = parse(defenses.Args, ["--defenses", "--skip-dp", "--n", "5"])
    assert d.defenses == () and d.skip_dp and d.dp_noise == defenses.DP_NOISE
    assert parse(defenses.Args, []).defenses is None  # all post-hoc defenses
    lay = parse(layers.Args, ["--ks", "1", "3", "--full-n", "0"])
    assert lay.ks == (1, 3) and lay.full_n == 0 and lay.full_ks == layers.FULL_KS and lay.full_steps == 80
    w = parse(watermark.Args, ["--only", "before,b", "--n-clean", "0", "--aiao-key", "K"])
    assert w.chosen() == ["before", "b"] and w.n_clean == 0 and w.aiao_key == "K" and w.long_steps == 2000


@dataclass
class Flags:
    skip: Switch = False  # a switch
    n: int = 1  # a number


@pytest.mark.parametrize(
    "argv, want",
    [
        ([], False),
        (["--skip"], True),
        (["--skip", "--n", "2"], True),
        (["--skip", "True"], True),
        (["--skip", "False"], False),
    ],
)
def test_a_switch_works_alone_or_with_a_value(argv, want):
    assert parse(Flags, argv).skip is want


def test_a_switch_refuses_other_words():
    with pytest.raises(SystemExit):
        parse(Flags, ["--skip", "maybe"])


def test_a_recorded_command_writes_paths_under_home_as_tilde_and_quotes_the_rest():
    from pathlib import Path

    from core.cli import command_line

    home = str(Path.home())
    line = command_line("core.studies.base", ["--compare", f"{home}/.cache/x y/base", "a b", f"{home}x"])
    assert line == f"python -m core.studies.base --compare ~/'.cache/x y/base' 'a b' {home}x"
