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

from .protocol_cli import add_cli, cli_settings
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
