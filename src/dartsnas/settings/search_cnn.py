"""Settings of ``dartsnas search cnn``; the defaults are the paper's (section 3.1.1 and appendix A.1.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import check, option
from ..genotype import CNN_PRIMITIVES
from .choices import DATASETS
from .runtime import RESUMABLE_RUN_OPTIONS, RunOptions
from .search import check_search_options, primitives_option
from .train_cnn import check_folder_options


@dataclass
class SearchConfig(RunOptions):
    """Settings of a CNN search; the defaults are the paper's (section 3.1.1 and appendix A.1.1)."""

    dataset: str = option("cifar10", "data source: cifar10 (folder or .npz), npz (any image set), digits "
                                     "(bundled, offline) or folder (your own images in class sub-folders)",
                          group="data", choices=DATASETS)
    data: str | None = option(None, "CIFAR-10 folder or .npz file (default: a per-user cache folder); with --dataset "
                                    "folder, a folder of class sub-folders (or of train/ and val/ ones, of which "
                                    "the search reads train/)", group="data")
    image_size: int | None = option(None, "--dataset folder: resize every image to N x N (default: the images' own "
                                          "size, which must then be the same for all)", group="data")
    batch_size: int = option(64, "batch size of both the weight and the alpha stream", group="optimisation")
    learning_rate: float = option(0.025, "initial weight learning rate (cosine-annealed)", group="optimisation",
                                  aliases=("--lr",))
    learning_rate_min: float = option(0.001, "final weight learning rate", group="optimisation")
    momentum: float = option(0.9, "weight SGD momentum", group="optimisation")
    weight_decay: float = option(3e-4, "weight decay of the weights", group="optimisation")
    arch_learning_rate: float = option(3e-4, "Adam learning rate of alpha", group="search")
    arch_weight_decay: float = option(1e-3, "weight decay of alpha", group="search")
    init_channels: int = option(16, "channels of the first cell (C)", group="network")
    layers: int = option(8, "number of cells", group="network")
    nodes: int = option(4, "intermediate nodes per cell", group="network")
    epochs: int = option(50, "search epochs", group="optimisation")
    train_portion: float = option(0.5, "fraction of the training set used for the weights; the rest trains alpha",
                                  group="data")
    primitives: tuple[str, ...] = primitives_option(CNN_PRIMITIVES)
    unrolled: bool = option(False, "second-order approximation (paper eq. 7) instead of first order", group="search")
    hvp: str = option("fd", "Hessian-vector product of the second-order step: fd (the paper's finite "
                            "difference) or exact (double backward)", group="search", choices=("fd", "exact"))
    hvp_r: float = option(0.01, "finite-difference step: eps = hvp_r / ||v||", group="search")
    hvp_check: bool = option(False, "once per epoch, log the cosine between the finite-difference and the "
                                    "exact Hessian-vector product on one batch", group="search")
    hessian_eig_every: int = option(0, "every N epochs, record the dominant eigenvalue of the Hessian of the "
                                       "validation loss in alpha (hessian_eig; R-DARTS), by 20 power iterations on "
                                       "one fixed validation batch (0: off)", group="search")
    early_stop: str | None = option(None, "end the search early: skip:N when the normal cell has N or more skip "
                                          "connections (DARTS+; keeps that cell), or eigen:RATIO[:K] "
                                          "when the local average of the dominant Hessian eigenvalue "
                                          "grew more than RATIO-fold over K epochs (R-DARTS; K 5; keeps "
                                          "the cell of K epochs before; needs --hessian_eig_every 1)",
                                    group="search")
    beta_decay: float = option(0.0, "beta-DARTS: weight lambda of the Beta-Decay regulariser (mean log-sum-exp of each "
                                    "edge's alphas) in the alpha objective, growing linearly over the epochs: lambda * "
                                    "epoch / epochs, 0 in the first (0: off)", group="search")
    alpha_noise: float = option(0.0, "SDARTS-RS: the weight step sees softmax(alpha) plus uniform noise in [-eps, eps] "
                                     "(clipped back to the simplex), eps growing linearly from eps/10 to this value "
                                     "over the epochs; the paper uses 0.3 (0: off)", group="search")
    alpha_adversarial: float = option(0.0, "SDARTS-ADV: the weight step sees softmax(alpha) plus the perturbation in "
                                           "[-eps, eps] that most raises its loss (projected gradient ascent, "
                                           "--adversarial_steps steps from a random start), eps growing as for "
                                           "--alpha_noise; the paper uses 0.3 (0: off)", group="search")
    adversarial_steps: int = option(7, "SDARTS-ADV: gradient steps of the attack on the mixing weights",
                                    group="search")
    dirichlet: bool = option(False, "DrNAS: each edge's mixing weights are a sample of Dirichlet(elu(alpha) + 1) "
                                    "(pathwise gradient) in training and its mean in evaluation and derivation, "
                                    "instead of softmax(alpha)", group="search")
    dirichlet_kl: float = option(0.0, "DrNAS: weight of the anchor regulariser KL(Dir(elu(alpha) + 1) || Dir(1)) "
                                      "(summed over edges) in the alpha objective; needs --dirichlet (0: off)",
                                 group="search")
    partial_channels: int = option(1, "PC-DARTS partial channel connections: 1/K of each edge's channels go through the "
                                      "mixed operation, the rest bypass it, then a channel shuffle (1: off, every "
                                      "channel; --init_channels must be divisible by K)", group="search")
    edge_normalization: bool = option(False, "PC-DARTS edge normalisation: each node weighs its incoming edges by a "
                                             "softmax over learned edge parameters (beta), and the derived cell ranks "
                                             "edges by edge weight times operation weight", group="search")
    aux_skip: float = option(0.0, "DARTS- auxiliary skip connection on every edge, outside the softmax, with a "
                                  "coefficient decaying linearly from this value to 0 over the search epochs (0: off)",
                             group="search")
    selection: str = option("darts", "how the final cell is chosen: darts (the strongest alphas, paper section 2.4) "
                                     "or pt (also DARTS-PT's perturbation-based selection after the search, with "
                                     "its default settings, into genotype_pt.json; dartsnas select RUN_DIR runs it "
                                     "with other settings)", group="search", choices=("darts", "pt"))
    grad_clip: float = option(5.0, "gradient-norm clip of the weight step", group="optimisation")
    seed: int = option(2, "random seed", group="optimisation")
    workers: int = option(0, "data-loading worker processes (images are kept in memory and augmented on the "
                             "device, so 0 is best for these data sets)", group="runtime")
    channels_last: str = option("auto", "channels-last memory format: auto (on for CPU, where depthwise and "
                                        "pointwise convolutions run several times faster), on or off",
                                group="speed", choices=("auto", "on", "off"))
    checkpoint_cells: bool = option(False, "recompute each cell's activations in the backward instead of keeping "
                                           "them: much less memory, slower steps (same results)", group="speed")
    flip_conv_backward: bool = option(True, "input gradient of size-keeping depthwise convolutions (5x5, dilated) by a "
                                            "convolution with the flipped kernel, and of dilated ones their weight "
                                            "gradient by undilated convolutions of the phase images: several times "
                                            "faster than PyTorch's backward on the CPU, same results (off: PyTorch's)", group="speed")
    fuse_edges: str = option("auto", "compute all edges leaving a cell state together: parameter-free operations "
                                     "once per state, each operation's convolutions on all those edges as one grouped "
                                     "convolution; fewer kernel calls, same results. auto: on the CPU for small "
                                     "networks (init_channels / partial_channels x image pixels up to 8192, where "
                                     "it is faster), edge by edge otherwise; on or off", group="speed", choices=("auto", "on", "off"))
    lean_memory: bool = option(True, "batch norms that end an operation keep their output instead of their input "
                                     "for the backward, max pooling finds its argmax again: about a quarter less "
                                     "memory, same results (off: PyTorch's plain operations)", group="speed")
    download: bool = option(True, "download CIFAR-10 when it is missing and the network allows", group="data")
    sync_bn: bool = option(False, "with several processes on CUDA: batch norm over the global batch (SyncBatchNorm) "
                                  "instead of each process's slice", group="distributed")

    def validate(self) -> None:
        rule = check_search_options(self, CNN_PRIMITIVES)
        check(rule is None or rule.kind != "skip" or "skip_connect" in self.primitives,
              f"--early_stop {self.early_stop} counts skip connections, but --primitives has no skip_connect")
        check(self.batch_size >= 1, f"--batch_size must be at least 1, got {self.batch_size}")
        check(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        check(0.0 < self.train_portion < 1.0,
              f"--train_portion must be between 0 and 1 (exclusive), got {self.train_portion}")
        for name in ("learning_rate", "arch_learning_rate", "grad_clip"):
            value = getattr(self, name)
            check(value > 0 and math.isfinite(value), f"--{name} must be a positive number, got {value}")
        for name in ("learning_rate_min", "weight_decay", "arch_weight_decay", "momentum", "beta_decay",
                     "alpha_noise", "alpha_adversarial", "dirichlet_kl"):
            value = getattr(self, name)
            check(value >= 0 and math.isfinite(value), f"--{name} must be >= 0, got {value}")
        check(not (self.dirichlet and self.alpha_noise > 0),
              "--alpha_noise perturbs softmax(alpha), which --dirichlet replaces; use one of them")
        check(self.dirichlet or self.dirichlet_kl == 0, "--dirichlet_kl needs --dirichlet")
        check(not (self.alpha_adversarial > 0 and (self.alpha_noise > 0 or self.dirichlet)),
              "--alpha_adversarial cannot be combined with --alpha_noise or --dirichlet; use one of them")
        check(self.adversarial_steps >= 1, f"--adversarial_steps must be at least 1, got {self.adversarial_steps}")
        check(self.learning_rate_min <= self.learning_rate,
              f"--learning_rate_min ({self.learning_rate_min}) must not exceed --learning_rate ({self.learning_rate})")
        check(self.init_channels >= 1, f"--init_channels must be at least 1, got {self.init_channels}")
        check(self.layers >= 3, f"--layers must be at least 3 (the search network has two reduction cells), "
                                f"got {self.layers}")
        check(self.partial_channels >= 1, f"--partial_channels must be at least 1, got {self.partial_channels}")
        check(self.init_channels % self.partial_channels == 0,
              f"--partial_channels {self.partial_channels} must divide --init_channels ({self.init_channels}): each "
              f"edge sends 1/{self.partial_channels} of its channels through the mixed operation")
        check(self.aux_skip >= 0 and math.isfinite(self.aux_skip), f"--aux_skip must be >= 0, got {self.aux_skip}")
        check(self.nodes >= 2, f"--nodes must be at least 2, got {self.nodes}")
        super().validate()
        if self.dataset == "npz":
            check(bool(self.data), "--dataset npz needs --data FILE.npz")
        check_folder_options(self.dataset, self.image_size, self.data)


# Settings that may differ when a run is resumed: they do not change the mathematics. The eigenvalue is a
# diagnostic that leaves the search where it was; --early_stop decides where the run ends, so it may not change.
RESUMABLE_OVERRIDES = {"channels_last", "checkpoint_cells", "fuse_edges", "lean_memory", "flip_conv_backward",
                       "workers", "download", "data", "sync_bn", "hessian_eig_every", "selection"} | RESUMABLE_RUN_OPTIONS
