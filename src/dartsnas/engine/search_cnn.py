"""``dartsnas search cnn``: the convolutional cell search of paper section 3.1.1.

``run(SearchConfig(...))`` is the whole job; the command line and the tests call it too.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .. import distributed
from ..config import add_config_arguments, check, explicit_args, make_config, option
from ..data.images import DATASETS, BatchStream, ImageData, Normalizer, epoch_generator, load_image_data, split_indices
from ..errors import UserError
from ..genotype import Genotype
from ..ops import fastconv
from ..ops.cnn import narrow_strided_pointwise
from ..search.architect import Architect, VirtualStep
from ..search.cnn import SearchNetwork
from ..utils import AverageMeter, accuracy
from . import common
from .common import finish_search, log_distributed, write_search_epoch
from .loop import EpochContext, Job, run_job

logger = logging.getLogger("dartsnas")

COMMAND = "search-cnn"


@dataclass
class SearchConfig:
    """Settings of a CNN search; the defaults are the paper's (facts section 2)."""

    dataset: str = option("cifar10", "data source: cifar10 (folder or .npz), npz (any image set) or digits "
                                     "(bundled, offline)", choices=DATASETS)
    data: str | None = option(None, "CIFAR-10 folder or .npz file (default: a per-user cache folder)")
    batch_size: int = option(64, "batch size of both the weight and the alpha stream")
    learning_rate: float = option(0.025, "initial weight learning rate (cosine-annealed)")
    learning_rate_min: float = option(0.001, "final weight learning rate")
    momentum: float = option(0.9, "weight SGD momentum")
    weight_decay: float = option(3e-4, "weight decay of the weights")
    arch_learning_rate: float = option(3e-4, "Adam learning rate of alpha")
    arch_weight_decay: float = option(1e-3, "weight decay of alpha")
    init_channels: int = option(16, "channels of the first cell (C)")
    layers: int = option(8, "number of cells")
    nodes: int = option(4, "intermediate nodes per cell")
    epochs: int = option(50, "search epochs")
    train_portion: float = option(0.5, "fraction of the training set used for the weights; the rest trains alpha")
    unrolled: bool = option(False, "second-order approximation (paper eq. 7) instead of first order")
    hvp: str = option("fd", "Hessian-vector product of the second-order step: fd (the paper's finite "
                            "difference) or exact (double backward)", choices=("fd", "exact"))
    hvp_r: float = option(0.01, "finite-difference step: eps = hvp_r / ||v||")
    hvp_check: bool = option(False, "once per epoch, log the cosine between the finite-difference and the "
                                    "exact Hessian-vector product on one batch")
    grad_clip: float = option(5.0, "gradient-norm clip of the weight step")
    seed: int = option(2, "random seed")
    save: str | None = option(None, "run directory (default: runs/search-cnn-<timestamp>)")
    device: str = option("auto", "auto, cpu or cuda")
    workers: int = option(0, "data-loading worker processes (images are kept in memory and augmented on the "
                             "device, so 0 is best for these data sets)")
    threads: int | None = option(None, "CPU threads for PyTorch (default: PyTorch's choice)")
    max_steps: int | None = option(None, "stop after this many steps in total, writing everything a finished "
                                         "run writes (smoke tests, timing)")
    eval_batches: int | None = option(None, "validate on at most this many batches per epoch (default: all)")
    report_freq: int = option(50, "log training progress every this many steps")
    channels_last: str = option("auto", "channels-last memory format: auto (on for CPU, where depthwise and "
                                        "pointwise convolutions run several times faster), on or off",
                                choices=("auto", "on", "off"))
    checkpoint_cells: bool = option(False, "recompute each cell's activations in the backward instead of keeping "
                                           "them: much less memory, slower steps (same results)")
    flip_conv_backward: bool = option(True, "input gradient of size-keeping depthwise convolutions (5x5, dilated) by a "
                                            "convolution with the flipped kernel, several times faster than PyTorch's "
                                            "backward on the CPU, same results (--no-flip_conv_backward: PyTorch's)")
    lean_memory: bool = option(True, "batch norms that end an operation keep their output instead of their input "
                                     "for the backward, max pooling finds its argmax again: about a quarter less "
                                     "memory, same results (--no-lean_memory: PyTorch's plain operations)")
    tensorboard: bool = option(False, "also write TensorBoard event files (needs the tensorboard package)")
    plots: bool = option(True, "draw figures into the run directory at the end")
    download: bool = option(True, "download CIFAR-10 when it is missing and the network allows")
    global_batch: str = option("scale", "with several processes (torchrun): scale (each process takes --batch_size, "
                                        "the global batch grows) or keep (the global batch stays --batch_size, split "
                                        "over the processes)", choices=distributed.GLOBAL_BATCH_CHOICES)
    sync_bn: bool = option(False, "with several processes on CUDA: batch norm over the global batch (SyncBatchNorm) "
                                  "instead of each process's slice")

    def validate(self) -> None:
        check(not (self.sync_bn and (self.hvp_check or (self.unrolled and self.hvp == "exact"))),
              "--sync_bn cannot be combined with --hvp exact or --hvp_check (SyncBatchNorm has no double backward); "
              "use --hvp fd")
        check(self.batch_size >= 1, f"--batch_size must be at least 1, got {self.batch_size}")
        check(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        check(0.0 < self.train_portion < 1.0,
              f"--train_portion must be between 0 and 1 (exclusive), got {self.train_portion}")
        for name in ("learning_rate", "arch_learning_rate", "hvp_r", "grad_clip"):
            value = getattr(self, name)
            check(value > 0 and math.isfinite(value), f"--{name} must be a positive number, got {value}")
        for name in ("learning_rate_min", "weight_decay", "arch_weight_decay", "momentum"):
            value = getattr(self, name)
            check(value >= 0 and math.isfinite(value), f"--{name} must be >= 0, got {value}")
        check(self.learning_rate_min <= self.learning_rate,
              f"--learning_rate_min ({self.learning_rate_min}) must not exceed --learning_rate ({self.learning_rate})")
        check(self.init_channels >= 1, f"--init_channels must be at least 1, got {self.init_channels}")
        check(self.layers >= 3, f"--layers must be at least 3 (the search network has two reduction cells), "
                                f"got {self.layers}")
        check(self.nodes >= 2, f"--nodes must be at least 2, got {self.nodes}")
        check(self.max_steps is None or self.max_steps >= 1, f"--max_steps must be at least 1, got {self.max_steps}")
        check(self.eval_batches is None or self.eval_batches >= 1,
              f"--eval_batches must be at least 1, got {self.eval_batches}")
        check(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        check(self.threads is None or self.threads >= 1, f"--threads must be at least 1, got {self.threads}")
        check(self.report_freq >= 1, f"--report_freq must be at least 1, got {self.report_freq}")
        if self.dataset == "npz":
            check(bool(self.data), "--dataset npz needs --data FILE.npz")


# Settings that may differ when a run is resumed: they do not change the mathematics.
RESUMABLE_OVERRIDES = {"device", "channels_last", "checkpoint_cells", "lean_memory", "flip_conv_backward", "workers",
                       "threads", "max_steps", "tensorboard", "plots", "report_freq", "download", "data", "sync_bn"}


@dataclass
class SearchResult:
    run_dir: Path
    genotype: Genotype
    metrics: list[dict[str, Any]]


def resume_config(run_dir: str | Path, overrides: dict[str, Any]) -> SearchConfig:
    """The stored config of the CNN search in ``run_dir`` with the allowed ``overrides`` applied."""
    return common.resume_config(SearchConfig, COMMAND, run_dir, overrides, RESUMABLE_OVERRIDES)


def _evaluate(model: SearchNetwork, stream: BatchStream, max_batches: int | None) -> tuple[float, float]:
    loss_m, acc_m = AverageMeter(), AverageMeter()
    model.eval()
    with torch.no_grad():
        for i, (x, y) in enumerate(stream.batches()):
            if max_batches is not None and i >= max_batches:
                break
            n = y.shape[0]
            if n == 0:  # a process's empty share of a short last batch
                continue
            logits = model(x)
            loss_m.update(F.cross_entropy(logits, y).item(), n)
            acc_m.update(accuracy(logits, y)[0], n)
    model.train()
    if distributed.is_distributed():
        # Each process evaluated its share: the weighted means over all of them.
        loss_sum, acc_sum, count = distributed.all_reduce_sum([loss_m.sum, acc_m.sum, loss_m.count])
        return loss_sum / max(count, 1), acc_sum / max(count, 1)
    return loss_m.avg, acc_m.avg


def use_channels_last(setting: str, device: torch.device, model: torch.nn.Module | None = None) -> bool:
    """Channels-last on the CPU, where depthwise and 1x1 convolutions run several times faster."""
    if setting in ("on", "off"):
        return setting == "on"
    return device.type == "cpu" and (model is None or not narrow_strided_pointwise(model))


def build_search(cfg: SearchConfig, data: ImageData, device: torch.device, dtype: torch.dtype = torch.float32
                 ) -> tuple[SearchNetwork, torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR, Architect]:
    """The search network, its two optimisers (paper section 3.1.1) and the architect."""
    model = SearchNetwork(cfg.init_channels, data.num_classes, cfg.layers, steps=cfg.nodes, multiplier=cfg.nodes,
                          in_channels=data.in_channels, lean_memory=cfg.lean_memory,
                          checkpoint_cells=cfg.checkpoint_cells).to(device=device, dtype=dtype)
    if cfg.flip_conv_backward:
        fastconv.use_flipped_backward(model)
    model = distributed.convert_sync_bn(model, cfg.sync_bn)
    if use_channels_last(cfg.channels_last, device, model):
        model = model.to(memory_format=torch.channels_last)
    w_opt = torch.optim.SGD(model.weight_parameters(), cfg.learning_rate, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, cfg.epochs, eta_min=cfg.learning_rate_min)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=cfg.arch_learning_rate, betas=(0.5, 0.999),
                             weight_decay=cfg.arch_weight_decay)

    def loss_fn(params: dict[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    architect = Architect(
        dict(model.named_weight_parameters()),
        {"alphas_normal": model.alphas_normal, "alphas_reduce": model.alphas_reduce},
        loss_fn, a_opt, w_opt, unrolled=cfg.unrolled, hvp=cfg.hvp, hvp_r=cfg.hvp_r,
        virtual=VirtualStep(momentum=cfg.momentum, weight_decay=cfg.weight_decay),
        # Several processes: every gradient the alpha step uses is averaged over them.
        reduce=distributed.all_reduce_mean if distributed.is_distributed() else None,
    )
    return model, w_opt, scheduler, architect


def weight_step(model: SearchNetwork, w_opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of the weights with alpha held fixed (no alpha gradient is computed)."""
    alphas = model.arch_parameters()
    for a in alphas:
        a.requires_grad_(False)
    try:
        w_opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        distributed.average_gradients(model.weight_parameters())  # no-op in a single process
        torch.nn.utils.clip_grad_norm_(model.weight_parameters(), grad_clip)
        w_opt.step()
    finally:
        for a in alphas:
            a.requires_grad_(True)
    return loss.detach(), logits.detach()


class CNNSearch(Job):
    """The convolutional search as a job of the epoch loop (:mod:`.loop`)."""

    kind = COMMAND
    command_line = "search cnn"
    nan_hint = "lower --learning_rate or --arch_learning_rate"

    def prepare(self, resume: str | Path | None) -> None:
        distributed.check_sync_bn(self.cfg.sync_bn, self.device)
        distributed.per_rank_batch(self.cfg.batch_size, self.cfg.global_batch)  # fail early when it does not divide

    def build(self, state: dict[str, Any] | None) -> None:
        cfg, device = self.cfg, self.device
        self.data = data = load_image_data(cfg.dataset, cfg.data, download=cfg.download)
        self.train_idx, self.valid_idx = train_idx, valid_idx = split_indices(len(data.train), cfg.train_portion)
        if len(train_idx) == 0 or len(valid_idx) == 0:
            raise UserError(f"--train_portion {cfg.train_portion} leaves an empty split of the {len(data.train)} "
                            f"training images; use a value nearer 0.5")
        self.model, self.w_opt, self.scheduler, self.architect = build_search(cfg, data, device)
        model = self.model
        images = data.train.to(device)
        normalize = Normalizer(data.mean, data.std, device,
                               channels_last=use_channels_last(cfg.channels_last, device, model))
        # Streams of global batches; with several processes each takes its slice of every batch.
        self.batch = batch = distributed.per_rank_batch(cfg.batch_size, cfg.global_batch) * distributed.world_size()
        shard = {"rank": distributed.rank(), "world": distributed.world_size()}
        self.train_stream = BatchStream(images, train_idx, batch, normalize, data.pad, data.flip, train=True, **shard)
        self.alpha_stream = BatchStream(images, valid_idx, batch, normalize, data.pad, data.flip, train=True, **shard)
        self.eval_stream = BatchStream(images, valid_idx, batch, normalize, train=False, **shard)
        if len(self.train_stream) == 0 or len(self.alpha_stream) == 0:
            raise UserError(f"the global batch of {batch} images is larger than the {len(train_idx)} / "
                            f"{len(valid_idx)} images of the weight / alpha split; use a smaller --batch_size or "
                            f"--global_batch keep")
        if state is not None:
            self.restore(model, state["model"])
            self.w_opt.load_state_dict(state["w_optimizer"])
            self.architect.arch_optimizer.load_state_dict(state["a_optimizer"])  # type: ignore[union-attr]
            self.scheduler.load_state_dict(state["scheduler"])

    def describe(self) -> None:
        data, cfg = self.data, self.cfg
        logger.info("data: %s, %d images for the weights, %d for alpha, %d classes, input %dx%dx%d", data.name,
                    len(self.train_idx), len(self.valid_idx), data.num_classes, data.in_channels, *data.image_size)
        n_params = sum(p.numel() for p in self.model.weight_parameters())
        logger.info("search network: %d weights (%.2f MB), %s order on %s", n_params, n_params * 4 / 1e6,
                    "second" if cfg.unrolled else "first", self.device)

    def start(self) -> None:
        # The same starting weights and alphas everywhere (they are equal already when seeded alike).
        distributed.broadcast_module(self.model)
        log_distributed(self.batch // distributed.world_size(), {"learning rate": self.cfg.learning_rate,
                                                                 "arch learning rate": self.cfg.arch_learning_rate})

    def steps_per_epoch(self) -> int:
        return len(self.train_stream)

    def start_epoch(self, epoch: int) -> dict[str, Any]:
        self.lr = self.scheduler.get_last_lr()[0]
        logger.info("epoch %d/%d lr %.6g", epoch + 1, self.cfg.epochs, self.lr)
        distributed.seed_rank(self.cfg.seed, epoch)
        if self.cfg.hvp_check:
            return _hvp_check(self.architect, self.train_stream, self.alpha_stream, self.cfg.seed, epoch, self.lr)
        return {}

    def train_epoch(self, epoch: int, ctx: EpochContext) -> dict[str, Any]:
        cfg = self.cfg
        train_gen = epoch_generator(cfg.seed, epoch, 0)
        alpha_batches = self.alpha_stream.forever(epoch_generator(cfg.seed, epoch, 1))
        self.loss_m, self.acc_m = loss_m, acc_m = AverageMeter(), AverageMeter()
        for i, (x, y) in enumerate(self.train_stream.batches(train_gen)):
            if i >= ctx.total:
                break
            x_val, y_val = next(alpha_batches)
            # Paper section 2.3 / Alg. 1: update alpha first, then the weights.
            self.architect.step((x, y), (x_val, y_val), self.lr)
            loss, logits = weight_step(self.model, self.w_opt, x, y, cfg.grad_clip)
            n = y.shape[0]
            loss_m.update(loss.item(), n)
            acc_m.update(accuracy(logits, y)[0], n)
            ctx.advance(loss_m.avg, acc=acc_m.avg)
        return {}

    def end_epoch(self, epoch: int, finished: bool) -> dict[str, Any]:
        model, loss_m, acc_m = self.model, self.loss_m, self.acc_m
        self.scheduler.step()
        if distributed.is_distributed():
            # Every process must derive the same cell; a mismatch stops the run with one error.
            distributed.check_same(distributed.fingerprint(model.arch_parameters(), str(model.genotype())),
                                   f"the alphas and genotype after epoch {epoch + 1}")
            # Running statistics came from each process's own batches: evaluate and save their mean.
            distributed.average_buffers(model)
            loss_m.sum, loss_m.count, acc_m.sum = distributed.all_reduce_sum([loss_m.sum, loss_m.count, acc_m.sum])
            acc_m.count = loss_m.count
        valid_loss, valid_acc = _evaluate(model, self.eval_stream, self.cfg.eval_batches)
        self.genotype = model.genotype()
        return {"train_loss": loss_m.avg, "train_acc": acc_m.avg, "valid_loss": valid_loss, "valid_acc": valid_acc,
                "lr": self.lr, "genotype": self.genotype.to_dict()}

    def log_epoch(self, record: dict[str, Any], finished: bool) -> None:
        if not finished:
            logger.info("genotype = %s", self.genotype)

    def write_epoch(self, record: dict[str, Any], finished: bool) -> None:
        assert self.rd is not None
        write_search_epoch(self.rd, self.model, self.genotype, record)

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "w_optimizer": self.w_opt.state_dict(),
                "a_optimizer": self.architect.arch_optimizer.state_dict(),  # type: ignore[union-attr]
                "scheduler": self.scheduler.state_dict(), "genotype": self.genotype.to_dict()}

    def finish(self, resumed_finished: bool) -> SearchResult:
        assert self.rd is not None
        genotype = self.model.genotype()
        if distributed.is_main():
            finish_search(self.rd, genotype, self.cfg.plots and not resumed_finished)
        return SearchResult(self.rd.path, genotype, self.rd.read_metrics())


def run(config: SearchConfig | None = None, resume: str | Path | None = None,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> SearchResult:
    """Search a convolutional cell and return the run directory, final genotype and metrics.

    Args:
        config: the settings (ignored when ``resume`` is given: the run's stored settings are used).
        resume: a run directory to continue from its last checkpoint.
        on_epoch_end: called as ``on_epoch_end(epoch, record)`` after each epoch's checkpoint.
    """
    if resume is not None:
        # A config from resume_config() carries allowed changes (device, threads...); else the stored one.
        cfg = config if config is not None else resume_config(resume, {})
    else:
        cfg = config if config is not None else SearchConfig()
    return run_job(CNNSearch(cfg), resume, on_epoch_end)


def _hvp_check(architect: Architect, train_stream: BatchStream, alpha_stream: BatchStream, seed: int, epoch: int,
               lr: float) -> dict[str, float]:
    # A separate generator, so that the check does not shift the batches the search itself sees.
    gen = epoch_generator(seed, epoch, 2)
    batch_t = next(iter(train_stream.batches(gen)))
    batch_v = next(iter(alpha_stream.batches(gen)))
    stats = architect.hvp_agreement(batch_t, batch_v, lr)
    logger.info("hvp check: cosine(finite difference, exact) = %.4f, implicit term = %.1f%% of the gradient norm",
                stats["hvp_cosine"], 100 * stats["implicit_ratio"])
    return stats


# -- command line -------------------------------------------------------------------------------


def _cli(args: argparse.Namespace) -> int:
    given = explicit_args(SearchConfig, args)
    if args.resume:
        if args.config:
            raise UserError("--config cannot be combined with --resume (the run keeps its stored settings)")
        cfg = resume_config(args.resume, given)
        result = run(cfg, resume=args.resume)
    else:
        result = run(make_config(SearchConfig, args, args.config))
    print(f"genotype = {result.genotype}")
    print(f"run directory: {result.run_dir}")
    return 0


def add_cli(groups: dict[str, argparse._SubParsersAction], commands: argparse._SubParsersAction) -> None:
    p = groups["search"].add_parser(
        "cnn", help="search a convolutional cell (CIFAR-10 by default)",
        description="Search a convolutional cell with DARTS. Defaults are the paper's first-order setting; "
                    "add --unrolled for second order.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML file (or shipped preset name) of settings; flags win")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted search from its last checkpoint")
    add_config_arguments(p, SearchConfig)
    p.set_defaults(handler=_cli)
