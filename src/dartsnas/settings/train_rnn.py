"""Settings of ``dartsnas train ptb|wt2``; the defaults are the paper's PTB settings (paper appendix A.2.2)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from ..config import check, make_config, option, redefault
from .runtime import RESUMABLE_RUN_OPTIONS, RunOptions

DEFAULT_DATA = {"ptb": "data/penn", "wt2": "data/wikitext-2"}
# WikiText-2 transfers the PTB cell with these changes (paper appendix A.2.4); `train wt2` starts from them.
WT2_DEFAULTS: dict[str, Any] = {"dataset": "wt2", "emsize": 700, "nhid": 700, "nhidlast": 700, "dropouth": 0.15,
                                "weight_decay": 5e-7}


@dataclass
class TrainConfig(RunOptions):
    """Settings of a recurrent training run; the defaults are the paper's PTB settings (paper appendix A.2.2)."""

    arch: str = option("DARTS", "architecture: a name (DARTS = DARTS_V2, DARTS_V1, ENAS), genotype.json, search "
                                "run directory or printed Genotype(recurrent=..., concat=...)", group="network")
    dataset: str = option("ptb", "which corpus the run trains on (set by the command)", group="data",
                          choices=("ptb", "wt2"), cli=False)
    data: str | None = option(None, "corpus folder with train.txt, valid.txt, test.txt (default: data/penn or "
                                    "data/wikitext-2)", group="data")
    emsize: int = option(850, "embedding size", group="network")
    nhid: int = option(850, "hidden units of the cell", group="network")
    nhidlast: int = option(850, "hidden units of the last layer (equal to nhid: tied weights)", group="network")
    learning_rate: float = option(20.0, "initial learning rate", group="optimisation", aliases=("--lr",))
    grad_clip: float = option(0.25, "gradient-norm clip", group="optimisation", aliases=("--clip",))
    epochs: int = option(8000, "upper epoch limit (the authors train until convergence)", group="optimisation")
    batch_size: int = option(64, "batch size", group="optimisation")
    small_batch_size: int | None = option(None, "compute the gradient in chunks of this many sequences and "
                                                "accumulate them (same update, less memory); must divide --batch_size",
                                          group="speed")
    bptt: int = option(35, "mean back-propagation-through-time length", group="optimisation")
    max_seq_len_delta: int = option(20, "longest sequence: bptt + this", group="optimisation")
    dropout: float = option(0.75, "locked dropout on the cell outputs", group="regularisation")
    dropouth: float = option(0.25, "dropout on h inside the cell", group="regularisation")
    dropoutx: float = option(0.75, "dropout on x inside the cell", group="regularisation")
    dropouti: float = option(0.2, "locked dropout on the embeddings", group="regularisation")
    dropoute: float = option(0.1, "embedding dropout (whole words)", group="regularisation")
    beta: float = option(1e-3, "temporal activation regularisation (slowness) coefficient", group="regularisation")
    weight_decay: float = option(8e-7, "weight decay", group="optimisation", aliases=("--wdecay",))
    nonmono: int = option(5, "switch to averaged SGD when validation is worse than the best of all but the last "
                             "this many epochs", group="optimisation")
    eval_batch_size: int = option(10, "validation batch size", group="evaluation")
    test_batch_size: int = option(1, "test batch size", group="evaluation")
    seed: int = option(1267, "random seed", group="optimisation")
    final_test: bool = option(True, "at the end, report the best model's test perplexity (batch --test_batch_size)",
                              group="evaluation")
    report_freq: int = redefault(RunOptions, "report_freq", 200)
    pack_weights: bool = option(True, "the cell's weights are packed once per sequence for its products (oneDNN, "
                                      "float32 on the CPU) and their gradient is one product over the whole "
                                      "sequence instead of one per time step: same results within float rounding "
                                      "(off: one PyTorch product per time step)", group="speed")

    def validate(self) -> None:
        for name in ("emsize", "nhid", "nhidlast", "epochs", "batch_size", "bptt", "eval_batch_size",
                     "test_batch_size"):
            check(getattr(self, name) >= 1, f"--{name} must be at least 1, got {getattr(self, name)}")
        check(self.emsize == self.nhid == self.nhidlast,
              f"--emsize, --nhid and --nhidlast must be equal (the decoder is tied to the embedding), got "
              f"{self.emsize}, {self.nhid}, {self.nhidlast}")
        for name in ("learning_rate", "grad_clip"):
            value = getattr(self, name)
            check(value > 0 and math.isfinite(value), f"--{name} must be a positive number, got {value}")
        for name in ("dropout", "dropouth", "dropoutx", "dropouti", "dropoute"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, f"--{name} must be in [0, 1), got {value}")
        check(self.beta >= 0 and self.weight_decay >= 0, "--beta and --weight_decay must be >= 0")
        check(self.max_seq_len_delta >= 0, f"--max_seq_len_delta must be >= 0, got {self.max_seq_len_delta}")
        check(self.nonmono >= 1, f"--nonmono must be at least 1, got {self.nonmono}")
        if self.small_batch_size is not None:
            check(self.small_batch_size >= 1 and self.batch_size % self.small_batch_size == 0,
                  f"--small_batch_size {self.small_batch_size} must divide --batch_size {self.batch_size}")
        super().validate()

    @property
    def data_dir(self) -> str:
        return self.data or DEFAULT_DATA[self.dataset]


# Settings that may differ when a run is resumed: they do not change the mathematics of past epochs.
RESUMABLE_OVERRIDES = {"data", "epochs", "final_test", "eval_batches", "pack_weights"} | RESUMABLE_RUN_OPTIONS


def config_from_args(args: argparse.Namespace, dataset: str) -> TrainConfig:
    """Defaults < dataset defaults (WikiText-2) < YAML file < flags; the corpus is the command's."""
    return make_config(TrainConfig, args, args.config, base=WT2_DEFAULTS if dataset == "wt2" else None,
                       dataset=dataset)
