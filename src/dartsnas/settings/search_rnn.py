"""Settings of ``dartsnas search rnn``; the defaults are the paper's (section 3.1.2 and appendix A.1.2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import check, option
from ..genotype import RNN_PRIMITIVES
from .choices import RNN_STEPS
from .runtime import RESUMABLE_RUN_OPTIONS, RunOptions
from .search import check_search_options, primitives_option


@dataclass
class RNNSearchConfig(RunOptions):
    """Settings of a recurrent search; the defaults are the paper's (section 3.1.2 and appendix A.1.2)."""

    data: str = option("data/penn", "corpus folder with train.txt, valid.txt, test.txt", group="data")
    emsize: int = option(300, "embedding size", group="network")
    nhid: int = option(300, "hidden units of the cell", group="network")
    nhidlast: int = option(300, "hidden units of the last layer (equal to nhid: tied weights)", group="network")
    nodes: int = option(RNN_STEPS, "intermediate nodes of the cell", group="network")
    learning_rate: float = option(20.0, "weight learning rate", group="optimisation", aliases=("--lr",))
    grad_clip: float = option(0.25, "gradient-norm clip of the weight step (and of the virtual step)",
                              group="optimisation", aliases=("--clip",))
    weight_decay: float = option(5e-7, "weight decay of the weights", group="optimisation", aliases=("--wdecay",))
    arch_learning_rate: float = option(3e-3, "Adam learning rate of alpha", group="search", aliases=("--arch_lr",))
    arch_weight_decay: float = option(1e-3, "weight decay of alpha", group="search", aliases=("--arch_wdecay",))
    epochs: int = option(50, "search epochs", group="optimisation")
    batch_size: int = option(256, "batch size of both the weight and the alpha stream", group="optimisation")
    bptt: int = option(35, "sequence length", group="optimisation")
    dropout: float = option(0.75, "locked dropout on the cell outputs", group="regularisation")
    dropouth: float = option(0.25, "dropout on h inside the cell", group="regularisation")
    dropoutx: float = option(0.75, "dropout on x inside the cell", group="regularisation")
    dropouti: float = option(0.2, "locked dropout on the embeddings", group="regularisation")
    dropoute: float = option(0.0, "embedding dropout (whole words)", group="regularisation")
    beta: float = option(1e-3, "temporal activation regularisation (slowness) coefficient", group="regularisation")
    primitives: tuple[str, ...] = primitives_option(RNN_PRIMITIVES)
    unrolled: bool = option(False, "second-order approximation (paper eq. 7) instead of first order", group="search")
    hvp: str = option("fd", "Hessian-vector product of the second-order step: fd (the paper's finite "
                            "difference) or exact (double backward)", group="search", choices=("fd", "exact"))
    hvp_r: float = option(0.01, "finite-difference step: eps = hvp_r / ||v||", group="search")
    hvp_check: bool = option(False, "once per epoch, log the cosine between the finite-difference and the "
                                    "exact Hessian-vector product on one batch", group="search")
    hessian_eig_every: int = option(0, "every N epochs, record the dominant eigenvalue of the Hessian of the "
                                       "validation loss in alpha (hessian_eig; R-DARTS), by 20 power iterations on "
                                       "one fixed validation batch (0: off)", group="search")
    early_stop: str | None = option(None, "end the search early: eigen:RATIO[:K] when the local average of the "
                                          "dominant Hessian eigenvalue grew more than RATIO-fold over K epochs "
                                          "(R-DARTS; K 5), keeping the cell of K epochs before; needs "
                                          "--hessian_eig_every 1 (skip:N is for CNN searches)",
                                    group="search")
    eval_batch_size: int = option(10, "validation batch size", group="evaluation")
    seed: int = option(3, "random seed", group="optimisation")
    sync_bn: bool = option(False, "with several processes on CUDA: the search cell's batch norm over the global "
                                  "batch (SyncBatchNorm) instead of each process's streams", group="distributed")
    compile: bool = option(False, "fuse the search cell's node computations with torch.compile (needs a C++ "
                                  "compiler on the CPU, Triton on CUDA): the first steps take about 20 s longer, "
                                  "later ones run faster; same results within float rounding; falls back to "
                                  "plain PyTorch with a warning if compiling fails", group="speed")

    def validate(self) -> None:
        rule = check_search_options(self, RNN_PRIMITIVES)
        for name in ("emsize", "nhid", "nhidlast", "nodes", "epochs", "batch_size", "bptt", "eval_batch_size"):
            check(getattr(self, name) >= 1, f"--{name} must be at least 1, got {getattr(self, name)}")
        check(self.batch_size >= 2, "--batch_size must be at least 2 (the search cell normalises node states over "
                                    "the batch)")
        check(self.emsize == self.nhid == self.nhidlast,
              f"--emsize, --nhid and --nhidlast must be equal (the decoder is tied to the embedding), got "
              f"{self.emsize}, {self.nhid}, {self.nhidlast}")
        for name in ("learning_rate", "grad_clip", "arch_learning_rate"):
            value = getattr(self, name)
            check(value > 0 and math.isfinite(value), f"--{name} must be a positive number, got {value}")
        for name in ("dropout", "dropouth", "dropoutx", "dropouti", "dropoute"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, f"--{name} must be in [0, 1), got {value}")
        check(self.beta >= 0 and self.weight_decay >= 0 and self.arch_weight_decay >= 0,
              "--beta, --weight_decay and --arch_weight_decay must be >= 0")
        check(rule is None or rule.kind != "skip",
              f"--early_stop {self.early_stop}: skip:N counts skip connections of a convolutional normal cell; "
              f"recurrent cells have none, use eigen:RATIO")
        super().validate()


# Settings that may differ when a run is resumed: they do not change the mathematics. The eigenvalue is a
# diagnostic that leaves the search where it was; --early_stop decides where the run ends, so it may not change.
RESUMABLE_OVERRIDES = {"data", "eval_batches", "sync_bn", "compile", "hessian_eig_every"} | RESUMABLE_RUN_OPTIONS
