"""The command line of ``dartsnas protocol cnn|rnn``: its stage flags and their help.

Kept apart from the protocol's engine, and free of torch, so that ``dartsnas protocol cnn --help``
answers as fast as every other command's help.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config import add_config_arguments, explicit_args
from .protocol_settings import STAGES, TARGETS, ProtocolOptions, Target


def _stage_flags(parser: argparse.ArgumentParser, target: Target) -> None:
    """``--search.epochs`` (also ``--search-epochs``) for every setting of every stage kind.

    They are accepted without being listed one by one: each stage takes the options of its own
    command, whose --help lists them, so the protocol's help sums each stage up in one line.
    """
    for stage in STAGES:
        add_config_arguments(parser, target.config_class(stage), prefix=stage, defaults=target.defaults.get(stage),
                             skip=target.fixed[stage], listed=False)


def cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol options and dotted stage options given on the command line."""
    given = explicit_args(ProtocolOptions, args)
    given.update({k: v for k, v in vars(args).items() if "." in k and k.partition(".")[0] in STAGES})
    return given


# The command whose options each stage takes, per target.
_STAGE_COMMANDS = {"cnn": {"search": "search cnn", "select": "train cifar10", "final": "train cifar10"},
                   "rnn": {"search": "search rnn", "select": "train ptb", "final": "train ptb"}}
_STAGE_ROLES = {"search": "every search", "select": "every selection training (short, scored on held-out data)",
                "final": "every final training of the selected cell"}


def add_cli(parser: argparse.ArgumentParser, target_name: str) -> None:
    """The stage flags of ``dartsnas protocol TARGET`` and the help section that sums them up."""
    target = TARGETS[target_name]
    _stage_flags(parser, target)
    lines = []
    for stage in STAGES:
        changed = ", ".join(f"{k} {v}" for k, v in target.defaults.get(stage, {}).items())
        lines.append(f"--{stage}.NAME VALUE: {_STAGE_ROLES[stage]}; NAME is any option of 'dartsnas "
                     f"{_STAGE_COMMANDS[target_name][stage]}' except {', '.join(sorted(target.fixed[stage]))}"
                     + (f" (protocol defaults: {changed})" if changed else ""))
    lines.append(f"Switches: --no-{STAGES[0]}.NAME. A --config YAML file may hold {', '.join(s + ':' for s in STAGES)} "
                 f"sections.")
    parser.add_argument_group("stage settings", "\n".join(lines))
