"""Command-line plumbing shared by the ``python -m core.<...>`` entry points.

Flags come from dataclasses through `tyro <https://brentyi.github.io/tyro/>`_: one flag per field,
every type (tuples, optionals, booleans as ``--flag True``), the field's trailing comment as its
help text, ``__post_init__`` validating the values. An entry point's arguments are a dataclass that
inherits the task's config and adds its own (paths, device), so flags, defaults and validation
never drift from the config the library functions take::

    @dataclass
    class Args(FinetuneConfig):
        photos: tuple[str, ...] = ()  # photo files of one person
        out: str = "lora.safetensors"  # where the LoRA is written

    args = parse(Args, argv)
    cfg = config_of(args, FinetuneConfig)

Sub-commands: :func:`parse_commands` with a mapping of name -> dataclass. A bool field annotated
:data:`Switch` also works as a bare flag (``--no-baselines``).
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Annotated


def _switch(args: list[str]) -> bool:
    if not args:
        return True
    word = args[0].lower()
    if word not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise ValueError(f"expected True or False, got {args[0]!r}")
    return word in ("true", "1", "yes", "on")


def _switch_type():
    from tyro.constructors import PrimitiveConstructorSpec

    return Annotated[
        bool,
        PrimitiveConstructorSpec(
            nargs=(0, 1),
            metavar="[True|False]",
            instance_from_str=_switch,
            is_instance=lambda x: isinstance(x, bool),
            str_from_instance=lambda b: [str(b)],
        ),
    ]


Switch = _switch_type()
"""A bool field whose flag works alone (``--skip-dp``) or with a value (``--skip-dp True``): for the
switches that commands recorded in ``docs/results`` pass alone. Every other bool takes a value
(``--flag True``)."""


def _tyro_config():
    import tyro

    return (tyro.conf.FlagConversionOff, tyro.conf.OmitArgPrefixes)


def parse(cls, argv=None, description: str | None = None, prog: str | None = None):
    """Parse ``argv`` (default ``sys.argv[1:]``) into an instance of dataclass ``cls``."""
    import tyro

    return tyro.cli(
        cls,
        args=list(sys.argv[1:] if argv is None else argv),
        description=description,
        prog=prog,
        config=_tyro_config(),
    )


def parse_commands(commands: dict, argv=None, description: str | None = None, prog: str | None = None):
    """``prog <command> [flags]``: returns (command name, its dataclass instance)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = ", ".join(commands)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog or 'python -m ...'} {{{names}}} [flags]\n\n{description or ''}\n\ncommands:")
        width = max(len(n) for n in commands)
        for name, cls in commands.items():
            print(f"  {name:{width}s}  {(cls.__doc__ or '').strip().splitlines()[0]}")
        raise SystemExit(0 if argv else 2)
    if argv[0] not in commands:
        raise SystemExit(f"unknown command {argv[0]!r}; choose one of: {names}")
    return argv[0], parse(commands[argv[0]], argv[1:], prog=f"{prog or ''} {argv[0]}".strip())


def config_of(args, cls, **overrides):
    """The ``cls`` config made of the fields of ``args`` (an instance of a subclass of ``cls``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})


def command_line(module: str, argv=None) -> str:
    """The command that was run (``python -m <module> <args>``, shell-quoted), for the record written
    beside an artifact."""
    argv = sys.argv[1:] if argv is None else argv
    return " ".join(["python", "-m", module, *(shell_word(str(a)) for a in argv)])


def shell_word(arg: str) -> str:
    """``arg`` shell-quoted, a path under the home folder written ``~/...`` (the same on any machine)."""
    home = str(Path.home())
    if arg.startswith(home + "/"):
        return "~/" + shlex.quote(arg[len(home) + 1 :])
    return shlex.quote(arg)
