"""``dartsnas search rnn``: the recurrent cell search of paper section 3.1.2 on Penn Treebank.

Each step (paper Alg. 1): one alpha step on a batch of the validation set, then one SGD step of
the weights on the next training chunk. The recurrent specifics (facts section 4): chunk lengths
are bptt (95 %) or bptt / 2 with the learning rate scaled by ``seq_len / bptt``; the alpha batches
walk through the validation set in step with the training position; both streams carry their
hidden state from chunk to chunk (detached); the second-order virtual step is plain SGD with the
training gradient clipped to 0.25 (see :class:`~dartsnas.search.architect.VirtualStep`).

``run(RNNSearchConfig(...))`` is the whole job; the command line and the tests call it too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from .. import distributed
from ..config import check, to_dict
from ..data.text import Corpus, batchify, get_batch
from ..errors import UserError
from ..genotype import RecurrentGenotype
from ..ops.loss import cross_entropy
from ..rundir import RunDir
from ..search.architect import Architect, VirtualStep
from ..search.rnn import RNNSearchModel
from ..settings.search_rnn import RESUMABLE_OVERRIDES, RNNSearchConfig
from ..utils import rng_state, seed_everything, set_rng_state
from .common import (
    FORMAT_VERSION,
    TensorBoard,
    finish_search,
    load_checkpoint,
    log_distributed,
    open_run_dir,
    progress,
    resume_config,
    run_logging,
    save_checkpoint,
    write_search_epoch,
)
from .evaluate_rnn import evaluate_sharded, perplexity
from .train_rnn import weight_step

logger = logging.getLogger("dartsnas")

COMMAND = "search-rnn"


@dataclass
class TextBatch:
    """A chunk for the architect's ``loss_fn``: tokens, targets, the stream's incoming hidden state
    and the seed of its dropout masks. ``hidden_out`` receives the (detached) final hidden state of
    the latest evaluation, which is how the alpha stream carries its state to the next chunk."""

    data: Tensor
    targets: Tensor
    hidden: Tensor
    seed: int
    hidden_out: Tensor | None = field(default=None, repr=False)


@dataclass
class RNNSearchResult:
    run_dir: Path
    genotype: RecurrentGenotype
    metrics: list[dict[str, Any]]


def make_loss_fn(model: RNNSearchModel) -> Callable[[dict[str, Tensor], TextBatch], Tensor]:
    def loss_fn(params: dict[str, Tensor], batch: TextBatch) -> Tensor:
        # The same masks for every evaluation of this chunk within an alpha step: the virtual step,
        # w' and the two finite-difference points then all differentiate one function of the weights.
        gen = torch.Generator(device=batch.data.device)
        gen.manual_seed(batch.seed)
        out = functional_call(model, params, (batch.data, batch.hidden), {"generator": gen})
        batch.hidden_out = out.hidden.detach()
        # The authors' architect uses the plain language-model loss (no TAR) on both batches.
        return cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), batch.targets.reshape(-1))
    return loss_fn


def build_search(cfg: RNNSearchConfig, ntoken: int, device: torch.device, dtype: torch.dtype = torch.float32
                 ) -> tuple[RNNSearchModel, torch.optim.SGD, Architect]:
    """The search model, its weight optimiser (SGD) and the architect (Adam on alpha)."""
    model = RNNSearchModel(ntoken, cfg.emsize, cfg.nhid, cfg.nhidlast, cfg.dropout, cfg.dropouth, cfg.dropoutx,
                           cfg.dropouti, cfg.dropoute, steps=cfg.nodes, compile=cfg.compile
                           ).to(device=device, dtype=dtype)
    model = distributed.convert_sync_bn(model, cfg.sync_bn)
    w_opt = torch.optim.SGD(model.weight_parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=cfg.arch_learning_rate, weight_decay=cfg.arch_weight_decay)
    architect = Architect(
        dict(model.named_weight_parameters()), {"alphas": model.alphas}, make_loss_fn(model), a_opt, w_opt,
        unrolled=cfg.unrolled, hvp=cfg.hvp, hvp_r=cfg.hvp_r,
        # Facts section 4: plain SGD virtual step, clipped gradient, v clipped, implicit term * eta * c.
        virtual=VirtualStep(momentum=0.0, weight_decay=cfg.weight_decay, clip=cfg.grad_clip),
        # Several processes: every gradient the alpha step uses is averaged over them.
        reduce=distributed.all_reduce_mean if distributed.is_distributed() else None,
    )
    return model, w_opt, architect


def search_step(model: RNNSearchModel, w_opt: torch.optim.Optimizer, architect: Architect, train: TextBatch,
                valid: TextBatch, lr: float, cfg: RNNSearchConfig) -> tuple[float, Tensor, Tensor]:
    """Alpha step on ``valid`` then weight step on ``train`` (paper Alg. 1).

    Returns the training loss and the next hidden states of the training and the alpha stream.
    """
    model.train()
    architect.step(train, valid, lr)
    assert valid.hidden_out is not None
    alphas = model.arch_parameters()
    for a in alphas:
        a.requires_grad_(False)  # the weight step needs no alpha gradient
    try:
        hiddens = [train.hidden]
        loss = weight_step(model, w_opt, model.weight_parameters(), train.data, train.targets, hiddens, lr,
                           cfg.grad_clip, cfg.beta)
    finally:
        for a in alphas:
            a.requires_grad_(True)
    return loss, hiddens[0], valid.hidden_out


def _new_seed() -> int:
    return int(torch.randint(0, 2**62, ()).item())


def run(config: RNNSearchConfig | None = None, resume: str | Path | None = None,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> RNNSearchResult:
    """Search a recurrent cell and return the run directory, final genotype and metrics."""
    if resume is not None:
        cfg = (config if config is not None and config.save == str(resume)
               else resume_config(RNNSearchConfig, COMMAND, resume, {}, RESUMABLE_OVERRIDES))
    else:
        cfg = config if config is not None else RNNSearchConfig()
    cfg.validate()
    device = distributed.setup(cfg.device)
    distributed.check_sync_bn(cfg.sync_bn, device)
    _rank_batch(cfg)  # fail early when it does not divide
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rd = open_run_dir(resume if resume is not None else cfg.save, COMMAND, resume is not None)
    cfg = dataclasses.replace(cfg, save=str(rd.path))
    with run_logging(rd):
        return _run(cfg, rd, device, resume is not None, on_epoch_end)


def _rank_batch(cfg: RNNSearchConfig) -> int:
    """This process's number of streams (columns) of both batches."""
    batch = distributed.per_rank_batch(cfg.batch_size, cfg.global_batch)
    check(batch >= 2, f"--global_batch keep leaves {batch} stream(s) per process; the search cell normalises node "
                      f"states over the batch, so each process needs at least 2 (raise --batch_size)")
    return batch


def _run(cfg: RNNSearchConfig, rd: RunDir, device: torch.device, resuming: bool,
         on_epoch_end: Callable[[int, dict[str, Any]], None] | None) -> RNNSearchResult:
    seed_everything(cfg.seed)
    corpus = Corpus(cfg.data)
    # Several processes: the global batch's columns are cut into one block per process, so together
    # they walk through the same streams as one process with the global batch.
    batch = _rank_batch(cfg)
    train_data = distributed.shard_columns(batchify(corpus.train, batch * distributed.world_size(), device))
    # Alpha batches: the validation set.
    search_data = distributed.shard_columns(batchify(corpus.valid, batch * distributed.world_size(), device))
    val_data = batchify(corpus.valid, cfg.eval_batch_size, device)
    model, w_opt, architect = build_search(cfg, len(corpus), device)
    a_opt = architect.arch_optimizer
    assert a_opt is not None
    start_epoch, step = 0, 0
    if resuming:
        state = load_checkpoint(rd.checkpoint, COMMAND)
        model.load_state_dict(state["model"])
        w_opt.load_state_dict(state["w_optimizer"])
        a_opt.load_state_dict(state["a_optimizer"])
        set_rng_state(state["rng"])
        start_epoch, step = state["epoch"], state["step"]
        if distributed.is_main():
            rd.truncate_metrics(start_epoch)
        if state.get("finished"):
            logger.info("run in %s already finished after epoch %d; nothing to do", rd.path, start_epoch)
            return RNNSearchResult(rd.path, model.genotype(), rd.read_metrics())
        logger.info("resuming %s after epoch %d (step %d)", rd.path, start_epoch, step)
    elif distributed.is_main():
        rd.write_config(to_dict(cfg), COMMAND)
        logger.info("config %s", to_dict(cfg))
        logger.info("data: %s, %d training and %d validation tokens, vocabulary %d", cfg.data, corpus.train.numel(),
                    corpus.valid.numel(), len(corpus))
        n_params = sum(p.numel() for p in model.weight_parameters())
        logger.info("search model: %d weights, %s order on %s", n_params, "second" if cfg.unrolled else "first",
                    device)
    distributed.broadcast_module(model)  # the same starting point everywhere
    log_distributed(batch, {"learning rate": cfg.learning_rate, "arch learning rate": cfg.arch_learning_rate},
                    unit="batch (streams)")
    if cfg.compile and distributed.is_main():
        logger.info("--compile: the first steps compile the search cell's node kernels (20-40 s, cached for later "
                    "runs)")

    tb = TensorBoard(rd.path / "tb") if cfg.tensorboard and distributed.is_main() else None
    genotype = model.genotype()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            lr = w_opt.param_groups[0]["lr"]
            record: dict[str, Any] = {"epoch": epoch + 1}
            distributed.seed_rank(cfg.seed, epoch)
            if cfg.hvp_check:
                record.update(_hvp_check(model, architect, train_data, search_data, cfg, lr))
            hidden, hidden_valid = model.init_hidden(batch), model.init_hidden(batch)
            loss_sum, n_batches, i = 0.0, 0, 0
            n_rows = train_data.shape[0]
            bar = progress(n_rows // cfg.bptt, f"epoch {epoch + 1}")
            while i < n_rows - 2 and (cfg.max_steps is None or step < cfg.max_steps):
                seq_len = int(cfg.bptt if np.random.random() < 0.95 else cfg.bptt / 2.0)
                data_v, targets_v = get_batch(search_data, i % (search_data.shape[0] - 1), cfg.bptt)
                data, targets = get_batch(train_data, i, seq_len)
                step_lr = lr * seq_len / cfg.bptt
                train = TextBatch(data, targets, hidden, _new_seed())
                valid = TextBatch(data_v, targets_v, hidden_valid, _new_seed())
                loss, hidden, hidden_valid = search_step(model, w_opt, architect, train, valid, step_lr, cfg)
                if not math.isfinite(loss):
                    raise UserError(f"the training loss became {loss} at step {step + 1}; lower --learning_rate or "
                                    f"--arch_learning_rate")
                loss_sum += loss
                n_batches += 1
                step += 1
                i += seq_len
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / n_batches:.3f}")
                if n_batches % cfg.report_freq == 0:
                    avg = loss_sum / n_batches
                    logger.info("epoch %d step %d loss %.4f ppl %.2f", epoch + 1, n_batches, avg, perplexity(avg))
                    logger.info("genotype = %s", model.genotype())
            bar.close()
            if distributed.is_distributed():
                # Every process must derive the same cell; a mismatch stops the run with one error.
                distributed.check_same(distributed.fingerprint(model.arch_parameters(), str(model.genotype())),
                                       f"the alphas and genotype after epoch {epoch + 1}")
                distributed.average_buffers(model)  # batch-norm running statistics of each process's streams
                loss_sum = distributed.all_reduce_sum([loss_sum])[0] / distributed.world_size()
            train_loss = loss_sum / max(n_batches, 1)
            valid_loss = evaluate_sharded(model, val_data, cfg.bptt, cfg.eval_batches)
            genotype = model.genotype()
            finished = epoch + 1 == cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)
            record.update({
                "step": step, "train_loss": train_loss, "train_ppl": perplexity(train_loss), "valid_loss": valid_loss,
                "valid_ppl": perplexity(valid_loss), "lr": lr, "time": time.perf_counter() - t0,
                "genotype": genotype.to_dict(),
            })
            logger.info("epoch %d train_loss %.4f valid_loss %.4f valid_ppl %.2f (%.1f s)", epoch + 1, train_loss,
                        valid_loss, record["valid_ppl"], record["time"])
            logger.info("genotype = %s", genotype)
            if distributed.is_main():
                write_search_epoch(rd, model, genotype, record)
                save_checkpoint(rd.checkpoint, {
                    "format_version": FORMAT_VERSION, "kind": COMMAND, "epoch": epoch + 1, "step": step,
                    "finished": finished, "model": model.state_dict(), "w_optimizer": w_opt.state_dict(),
                    "a_optimizer": a_opt.state_dict(), "rng": rng_state(), "config": to_dict(cfg),
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
    return RNNSearchResult(rd.path, genotype, rd.read_metrics())


def _hvp_check(model: RNNSearchModel, architect: Architect, train_data: Tensor, search_data: Tensor,
               cfg: RNNSearchConfig, lr: float) -> dict[str, float]:
    # Its own generator and fresh hidden states, so that the check does not shift what the search sees.
    gen = torch.Generator().manual_seed(cfg.seed)
    seeds = torch.randint(0, 2**62, (2,), generator=gen).tolist()
    data, targets = get_batch(train_data, 0, cfg.bptt)
    data_v, targets_v = get_batch(search_data, 0, cfg.bptt)
    train = TextBatch(data, targets, model.init_hidden(data.shape[1]), int(seeds[0]))
    valid = TextBatch(data_v, targets_v, model.init_hidden(data_v.shape[1]), int(seeds[1]))
    model.train()
    stats = architect.hvp_agreement(train, valid, lr)
    logger.info("hvp check: cosine(finite difference, exact) = %.4f, implicit term = %.1f%% of the gradient norm",
                stats["hvp_cosine"], 100 * stats["implicit_ratio"])
    return stats
