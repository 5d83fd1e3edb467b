"""Command-line plumbing shared by the ``python -m core.<task>`` entry points: one flag per field
of a config dataclass, so flags, defaults and validation never drift from the config."""

from __future__ import annotations

import argparse
from dataclasses import fields


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_config_flags(ap: argparse.ArgumentParser, cls, skip=()) -> None:
    """``--field-name`` for every scalar field of dataclass ``cls`` (default: the field's default)."""
    inst = cls()
    for f in fields(cls):
        v = getattr(inst, f.name)
        if f.name in skip or not isinstance(v, (bool, int, float, str)):
            continue
        ap.add_argument("--" + f.name.replace("_", "-"), type=_bool if isinstance(v, bool) else type(v), default=v)


def config_from_args(cls, args: dict, **extra):
    """Build ``cls`` from the parsed flags that name its fields (plus ``extra``)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in args.items() if k in names}, **extra)


def command_line(module: str, argv) -> str:
    """The command that was run (``python -m <module> <args>``, shell-quoted), for the record written
    beside an artifact."""
    import shlex

    return f"python -m {module} " + " ".join(shlex.quote(str(a)) for a in argv)
