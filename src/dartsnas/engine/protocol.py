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
import dataclasses
import typing
from collections.abc import Callable
from typing import Any

from ..config import _base_type, _parse_value, add_config_arguments, explicit_args
from ..errors import UserError
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
    """``--search.epochs`` (also ``--search-epochs``) for every setting of every stage kind."""
    for stage in STAGES:
        cls = target.config_class(stage)
        group = parser.add_argument_group(f"{stage} stage", {
            "search": "settings of every search",
            "select": "settings of every selection training (short, scored on held-out training data)",
            "final": "settings of every final training of the selected cell",
        }[stage])
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in target.fixed[stage] or not f.metadata.get("cli", True):
                continue
            kind, optional = _base_type(hints[f.name])
            dashed = f.name.replace("_", "-")
            names = list(dict.fromkeys([f"--{stage}.{f.name}", f"--{stage}.{dashed}", f"--{stage}-{dashed}"]))
            default = target.defaults.get(stage, {}).get(f.name, f.default)
            help_text = f"{f.metadata.get('help', '')} (default: {default})"
            dest = f"{stage}.{f.name}"
            if kind is bool:
                group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                group.add_argument(*names, dest=dest, type=_parse_value(kind, optional, f"{stage}.{f.name}"),
                                   choices=f.metadata.get("choices"), default=argparse.SUPPRESS,
                                   metavar=f.name.upper(), help=help_text)


def cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol options and dotted stage options given on the command line."""
    given = explicit_args(ProtocolOptions, args)
    given.update({k: v for k, v in vars(args).items() if "." in k and k.partition(".")[0] in STAGES})
    return given


def _cli(target: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        given = cli_settings(args)
        if args.resume:
            stage_given = sorted(k for k in given if "." in k or k not in RUNTIME_OPTIONS)
            if args.config or stage_given:
                raise UserError("--resume keeps the protocol's stored settings; only --jobs, --device and --threads "
                                "may be given with it")
            protocol = load_protocol(args.resume, given, target)
        else:
            protocol = make_protocol(target, given, args.config)
        result = run(protocol)
        final = result.summary["final"]["test"]
        sel = result.summary["selection"]
        print(f"selected: the cell of search seed {sel['seed']} ({sel['metric']} {sel['score']:.4f})")
        if final["mean"] is not None:
            spread = f" +- {final['std']:.2f}" if final["std"] is not None else ""
            print(f"test {result.summary['test_metric']}: {final['mean']:.2f}{spread} over {final['n']} runs")
        print(f"summary: {result.run_dir / 'summary.md'}")
        return 0
    return handler


def add_cli(groups: dict[str, argparse._SubParsersAction], commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "protocol", help="search with several seeds, select the best cell, train it several times",
        description="The paper's evaluation protocol in one resumable command: a search per seed, a short training "
                    "of each derived cell scored on held-out training data, then several full trainings of the "
                    "best cell, reported as mean +- std.")
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name, help_text in (("cnn", "convolutional cells on CIFAR-10"), ("rnn", "recurrent cells on PTB")):
        sub = targets.add_parser(
            name, help=help_text,
            usage=f"dartsnas protocol {name} [--budget tiny] [--seeds N] [--final-runs N] [--jobs N] [--data PATH] "
                  f"[--search.NAME VALUE] [--select.NAME VALUE] [--final.NAME VALUE] [--config FILE] [...]",
            description=f"DARTS protocol for {help_text}. Stage settings: --search.NAME, --select.NAME, "
                        f"--final.NAME (or a YAML file with search:, select:, final: sections). Running the same "
                        f"command again resumes it.")
        sub.add_argument("--config", metavar="FILE", help="YAML file (or shipped preset) of protocol and stage "
                                                          "settings; flags win")
        sub.add_argument("--resume", metavar="PROTOCOL_DIR", help="continue a protocol with its stored settings")
        add_config_arguments(sub, ProtocolOptions)
        _stage_flags(sub, TARGETS[name])
        sub.set_defaults(handler=_cli(name))
