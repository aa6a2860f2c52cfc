"""``dartsnas protocol cnn|rnn``: the paper's whole evaluation protocol in one resumable command.

DARTS lands in a different local minimum on every seed, so the paper (section 3.2) searches with
several seeds, trains every derived cell briefly from scratch, keeps the cell with the best
validation score and reports the mean of several full trainings of it. Here each of those runs is
an ordinary run directory under one protocol directory::

    PROTOCOL_DIR/
      config.yaml  manifest.json  log.txt
      data/train.npz            (cnn) the training images only: searches and selection read this file
      search/seed-S/            one search per seed
      select/seed-S/            the cell of search S trained briefly, scored on held-out training images
      final/run-R/              the selected cell trained in full (seed + R), tested once at the end
      genotype.json             the selected cell
      summary.md  summary.json  report.html

``manifest.json`` records which stage is done. Running the same command again resumes: finished
stages are skipped and an unfinished one continues from its last epoch checkpoint through its own
engine's resume, so an interrupted protocol loses at most the epoch in progress.

The work is split by job: :mod:`.protocol_settings` resolves the settings, :mod:`.protocol_plan`
lists the stages and their configs, :mod:`.protocol_scheduler` (with :mod:`.protocol_executors`)
runs them, :mod:`.protocol_summary` selects the cell and writes the summary, and
:mod:`.protocol_runner` ties these together. This module re-exports their public names, so that
``dartsnas.engine.protocol`` stays the one import for the Python API, and holds the command line.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config import add_config_arguments, explicit_args
from .protocol_executors import run_stage
from .protocol_manifest import Manifest
from .protocol_plan import Stage, plan, search_seed, stage_config, stage_splits
from .protocol_runner import ProtocolResult, run
from .protocol_settings import (
    BUDGETS,
    RUNTIME_OPTIONS,
    RUNTIME_STAGE_OPTIONS,
    STAGES,
    TARGETS,
    Protocol,
    ProtocolOptions,
    Target,
    load_protocol,
    make_protocol,
    read_protocol_yaml,
)
from .protocol_summary import (
    best_record,
    build_summary,
    final_test_numbers,
    last_record,
    mean_std,
    read_genotype,
    selection_score,
    write_summary,
)

__all__ = [
    "BUDGETS", "RUNTIME_OPTIONS", "RUNTIME_STAGE_OPTIONS", "STAGES", "TARGETS", "Manifest", "Protocol",
    "ProtocolOptions", "ProtocolResult", "Stage", "Target", "add_cli", "best_record", "build_summary", "cli_settings",
    "final_test_numbers", "last_record", "load_protocol", "make_protocol", "mean_std", "plan", "read_genotype",
    "read_protocol_yaml", "run", "run_stage", "search_seed", "selection_score", "stage_config", "stage_splits",
    "write_summary",
]


# -- command line -------------------------------------------------------------------------------


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
