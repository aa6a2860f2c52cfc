"""Settings of ``dartsnas select`` (DARTS-PT, perturbation-based selection of the cell from a finished CNN
search, Wang et al., ICLR 2021, section 4); the defaults are those of the authors' code for the DARTS
search space (5 tuning epochs between decisions, a tenth of the search's learning rate, alpha updated,
accuracy as the criterion)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import check, option
from .runtime import RunOptions

# Where a selection keeps its own run directory inside the search's, and the genotype it writes there.
SELECTION_DIR = "selection_pt"
GENOTYPE_FILE = "genotype_pt.json"


@dataclass
class SelectConfig(RunOptions):
    """Settings of a DARTS-PT selection; the defaults are the authors' DARTS-space settings."""

    epochs_per_edge: int = option(5, "epochs of supernet tuning after each round of decisions (one edge, later one "
                                     "node, of each cell type); the authors tune 5 in the DARTS space", group="optimisation")
    tune_steps: int | None = option(None, "at most this many tuning steps after each round (default: "
                                          "--epochs_per_edge full epochs); for quick, scaled-down selections",
                                    group="optimisation")
    tune_lr_factor: float = option(0.1, "the tuning's weight learning rate is the search's --learning_rate times "
                                        "this, cosine-annealed to its --learning_rate_min over all the tuning",
                                   group="optimisation")
    tune_alpha: bool = option(True, "also update the alphas of the undecided edges while tuning, as in the search "
                                    "(off: weights only)", group="search")
    criterion: str = option("acc", "what a removal costs: acc (the drop in validation accuracy, the paper's) or "
                                   "loss (the rise in validation loss); ties are broken by the other",
                            group="search", choices=("acc", "loss"))
    seed: int = option(2, "seed of the random order of the edges and nodes and of the tuning batches",
                       group="optimisation")
    data: str | None = option(None, "the search's data file or folder, if it has moved since the search",
                              group="data")
    # Set by the selection itself, not by the user.
    epochs: int = option(1, "rounds of decisions", cli=False)
    save: str | None = option(None, "the selection's folder inside the search run", cli=False)
    max_steps: int | None = option(None, "unused: every decision must be made", cli=False)
    plots: bool = option(False, "unused", cli=False)
    global_batch: str = option("scale", "unused: a selection runs in one process", cli=False)

    def validate(self) -> None:
        check(self.epochs_per_edge >= 0, f"--epochs_per_edge must be >= 0, got {self.epochs_per_edge}")
        check(self.tune_steps is None or self.tune_steps >= 0, f"--tune_steps must be >= 0, got {self.tune_steps}")
        check(self.tune_lr_factor > 0 and math.isfinite(self.tune_lr_factor),
              f"--tune_lr_factor must be a positive number, got {self.tune_lr_factor}")
        super().validate()


# Settings a selection may change when it is continued: they do not change its decisions.
RESUMABLE_OVERRIDES = {"device", "threads", "data", "report_freq", "tensorboard"}
