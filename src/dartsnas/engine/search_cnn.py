"""``dartsnas search cnn``: the convolutional cell search of paper section 3.1.1.

``run(SearchConfig(...))`` is the whole job (the settings live in :mod:`dartsnas.settings.search_cnn`);
the command line and the tests call it too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .. import distributed
from ..config import to_dict
from ..data.images import BatchStream, ImageData, Normalizer, epoch_generator, load_image_data, split_indices
from ..errors import UserError
from ..genotype import Genotype
from ..ops import fastconv
from ..ops.cnn import narrow_strided_pointwise
from ..rundir import RunDir
from ..search.architect import Architect, VirtualStep
from ..search.cnn import SearchNetwork
from ..settings.search_cnn import RESUMABLE_OVERRIDES, SearchConfig
from ..utils import AverageMeter, accuracy, rng_state, seed_everything, set_rng_state
from . import common
from .common import (
    FORMAT_VERSION,
    TensorBoard,
    finish_search,
    load_checkpoint,
    log_distributed,
    open_run_dir,
    progress,
    run_logging,
    save_checkpoint,
    write_search_epoch,
)

logger = logging.getLogger("dartsnas")

COMMAND = "search-cnn"


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
    cfg.validate()
    device = distributed.setup(cfg.device)
    distributed.check_sync_bn(cfg.sync_bn, device)
    distributed.per_rank_batch(cfg.batch_size, cfg.global_batch)  # fail early when it does not divide
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    rd = open_run_dir(resume if resume is not None else cfg.save, COMMAND, resume is not None)
    cfg = dataclasses.replace(cfg, save=str(rd.path))
    with run_logging(rd):
        try:
            return _run(cfg, rd, device, resume is not None, on_epoch_end)
        except KeyboardInterrupt:
            if rd.checkpoint.exists() and distributed.is_main():
                logger.warning("interrupted; continue with: dartsnas search cnn --resume %s", rd.path)
            raise


def _run(cfg: SearchConfig, rd: RunDir, device: torch.device, resuming: bool,
         on_epoch_end: Callable[[int, dict[str, Any]], None] | None) -> SearchResult:
    seed_everything(cfg.seed)
    data = load_image_data(cfg.dataset, cfg.data, download=cfg.download)
    train_idx, valid_idx = split_indices(len(data.train), cfg.train_portion)
    if len(train_idx) == 0 or len(valid_idx) == 0:
        raise UserError(f"--train_portion {cfg.train_portion} leaves an empty split of the {len(data.train)} "
                        f"training images; use a value nearer 0.5")
    model, w_opt, scheduler, architect = build_search(cfg, data, device)
    images = data.train.to(device)
    normalize = Normalizer(data.mean, data.std, device,
                           channels_last=use_channels_last(cfg.channels_last, device, model))
    # Streams of global batches; with several processes each takes its slice of every batch.
    batch = distributed.per_rank_batch(cfg.batch_size, cfg.global_batch) * distributed.world_size()
    shard = {"rank": distributed.rank(), "world": distributed.world_size()}
    train_stream = BatchStream(images, train_idx, batch, normalize, data.pad, data.flip, train=True, **shard)
    alpha_stream = BatchStream(images, valid_idx, batch, normalize, data.pad, data.flip, train=True, **shard)
    eval_stream = BatchStream(images, valid_idx, batch, normalize, train=False, **shard)
    if len(train_stream) == 0 or len(alpha_stream) == 0:
        raise UserError(f"the global batch of {batch} images is larger than the {len(train_idx)} / {len(valid_idx)} "
                        f"images of the weight / alpha split; use a smaller --batch_size or --global_batch keep")
    start_epoch, step = 0, 0
    if resuming:
        state = load_checkpoint(rd.checkpoint, COMMAND)
        model.load_state_dict(state["model"])
        w_opt.load_state_dict(state["w_optimizer"])
        architect.arch_optimizer.load_state_dict(state["a_optimizer"])  # type: ignore[union-attr]
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_epoch, step = state["epoch"], state["step"]
        if distributed.is_main():
            rd.truncate_metrics(start_epoch)
        if state.get("finished"):
            logger.info("run in %s already finished after epoch %d; nothing to do", rd.path, start_epoch)
            genotype = model.genotype()
            return SearchResult(rd.path, genotype, rd.read_metrics())
        logger.info("resuming %s after epoch %d (step %d)", rd.path, start_epoch, step)
    elif distributed.is_main():
        rd.write_config(to_dict(cfg), COMMAND)
        logger.info("config %s", to_dict(cfg))
        logger.info("data: %s, %d images for the weights, %d for alpha, %d classes, input %dx%dx%d", data.name,
                    len(train_idx), len(valid_idx), data.num_classes, data.in_channels, *data.image_size)
        n_params = sum(p.numel() for p in model.weight_parameters())
        logger.info("search network: %d weights (%.2f MB), %s order on %s", n_params, n_params * 4 / 1e6,
                    "second" if cfg.unrolled else "first", device)
    # The same starting weights and alphas everywhere (they are equal already when seeded alike).
    distributed.broadcast_module(model)
    log_distributed(batch // distributed.world_size(), {"learning rate": cfg.learning_rate,
                                                         "arch learning rate": cfg.arch_learning_rate})

    tb = TensorBoard(rd.path / "tb") if cfg.tensorboard and distributed.is_main() else None
    genotype = model.genotype()
    finished = False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            record: dict[str, Any] = {"epoch": epoch + 1}
            logger.info("epoch %d/%d lr %.6g", epoch + 1, cfg.epochs, lr)
            distributed.seed_rank(cfg.seed, epoch)
            train_gen = epoch_generator(cfg.seed, epoch, 0)
            alpha_batches = alpha_stream.forever(epoch_generator(cfg.seed, epoch, 1))
            if cfg.hvp_check:
                record.update(_hvp_check(architect, train_stream, alpha_stream, cfg.seed, epoch, lr))
            loss_m, acc_m = AverageMeter(), AverageMeter()
            n_steps = len(train_stream)
            if cfg.max_steps is not None:
                n_steps = min(n_steps, cfg.max_steps - step)
            bar = progress(n_steps, f"epoch {epoch + 1}")
            for i, (x, y) in enumerate(train_stream.batches(train_gen)):
                if i >= n_steps:
                    break
                x_val, y_val = next(alpha_batches)
                # Paper section 2.3 / Alg. 1: update alpha first, then the weights.
                architect.step((x, y), (x_val, y_val), lr)
                loss, logits = weight_step(model, w_opt, x, y, cfg.grad_clip)
                step += 1
                n = y.shape[0]
                loss_m.update(loss.item(), n)
                acc_m.update(accuracy(logits, y)[0], n)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_m.avg:.3f}", acc=f"{acc_m.avg:.1f}")
                if not math.isfinite(loss_m.avg):
                    raise UserError(f"the training loss became {loss_m.avg} at step {step}; lower --learning_rate "
                                    f"or --arch_learning_rate")
                if (i + 1) % cfg.report_freq == 0:
                    logger.info("train step %d/%d loss %.4f acc %.2f", i + 1, n_steps, loss_m.avg, acc_m.avg)
            bar.close()
            scheduler.step()
            if distributed.is_distributed():
                # Every process must derive the same cell; a mismatch stops the run with one error.
                distributed.check_same(distributed.fingerprint(model.arch_parameters(), str(model.genotype())),
                                       f"the alphas and genotype after epoch {epoch + 1}")
                # Running statistics came from each process's own batches: evaluate and save their mean.
                distributed.average_buffers(model)
                loss_m.sum, loss_m.count, acc_m.sum = distributed.all_reduce_sum([loss_m.sum, loss_m.count, acc_m.sum])
                acc_m.count = loss_m.count
            valid_loss, valid_acc = _evaluate(model, eval_stream, cfg.eval_batches)
            genotype = model.genotype()
            finished = epoch + 1 == cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)
            record.update({
                "step": step, "train_loss": loss_m.avg, "train_acc": acc_m.avg, "valid_loss": valid_loss,
                "valid_acc": valid_acc, "lr": lr, "time": time.perf_counter() - t0, "genotype": genotype.to_dict(),
            })
            logger.info("epoch %d train_loss %.4f train_acc %.2f valid_loss %.4f valid_acc %.2f (%.1f s)",
                        epoch + 1, loss_m.avg, acc_m.avg, valid_loss, valid_acc, record["time"])
            logger.info("genotype = %s", genotype)
            if distributed.is_main():
                write_search_epoch(rd, model, genotype, record)
                save_checkpoint(rd.checkpoint, {
                    "format_version": FORMAT_VERSION, "kind": COMMAND, "epoch": epoch + 1, "step": step,
                    "finished": finished, "model": model.state_dict(), "w_optimizer": w_opt.state_dict(),
                    "a_optimizer": architect.arch_optimizer.state_dict(),  # type: ignore[union-attr]
                    "scheduler": scheduler.state_dict(), "rng": rng_state(), "config": to_dict(cfg),
                    "genotype": genotype.to_dict(),
                })
            if tb is not None:
                tb.log(record, epoch + 1)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
            if finished:
                break
    finally:
        if tb is not None:
            tb.close()
    if distributed.is_main():
        finish_search(rd, genotype, cfg.plots)
    distributed.barrier()  # the run directory is complete when run() returns in any process
    return SearchResult(rd.path, genotype, rd.read_metrics())


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
