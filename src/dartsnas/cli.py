"""The ``dartsnas`` command line: ``dartsnas <command> [<target>] [flags]``.

Every command is a thin layer over a ``run(config)`` function of the Python API. Bad input raises
:class:`UserError`, printed here as one line (exit status 2); no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import UserError

# (group, help) of commands that take a target (``search cnn``, ``train cifar10``, ...).
GROUPS: list[tuple[str, str]] = [
    ("search", "search a cell (differentiable architecture search)"),
    ("train", "train an architecture from scratch"),
    ("test", "evaluate a trained checkpoint"),
    ("plot", "draw cells, search progress and learning curves"),
]

# Modules that add subcommands: each defines ``add_cli(groups, commands)``. ``groups`` maps a group
# name to its subparsers; ``commands`` is the top-level subparsers (for commands without a target).
COMMAND_MODULES: list[str] = [
    "dartsnas.engine.search_cnn",
    "dartsnas.engine.train_cnn",
    "dartsnas.engine.evaluate_cnn",
    "dartsnas.engine.search_rnn",
    "dartsnas.engine.train_rnn",
    "dartsnas.engine.evaluate_rnn",
    "dartsnas.engine.protocol",
    "dartsnas.commands",
    "dartsnas.commands_viz",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dartsnas",
        description="DARTS: differentiable architecture search (Liu, Simonyan & Yang, ICLR 2019).",
    )
    parser.add_argument("--version", action="version", version=f"dartsnas {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups = {}
    for name, help_text in GROUPS:
        group_parser = commands.add_parser(name, help=help_text, description=help_text)
        groups[name] = group_parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # An optional component whose own dependency is missing must not break the rest.
            if exc.name and exc.name.startswith("dartsnas"):
                raise
            continue
        module.add_cli(groups, commands)
    # Drop groups nobody filled (e.g. a component not installed).
    for name, sub in groups.items():
        if not sub.choices:
            commands.choices.pop(name, None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int | None] = args.handler
    # Under torchrun every process runs this command: only rank 0 prints results; every process
    # reports its errors, the others saying which one they are.
    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else "0"
    try:
        with contextlib.ExitStack() as stack:
            if rank != "0":
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            return int(handler(args) or 0)
    except UserError as exc:
        where = "" if rank == "0" else f"(rank {rank}) "
        print(f"dartsnas: error: {where}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("dartsnas").warning("interrupted")
        print("dartsnas: interrupted; a run can be continued with --resume RUN_DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
