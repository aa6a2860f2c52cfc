"""``dartsnas search rnn``: the recurrent cell search of paper section 3.1.2 on Penn Treebank.

Each step (paper Alg. 1): one alpha step on a batch of the validation set, then one SGD step of
the weights on the next training chunk. The recurrent specifics (paper section 3.1.2, appendix A.1.2; the authors' rnn/train_search.py): chunk lengths
are bptt (95 %) or bptt / 2 with the learning rate scaled by ``seq_len / bptt``; the alpha batches
walk through the validation set in step with the training position; both streams carry their
hidden state from chunk to chunk (detached); the second-order virtual step is plain SGD with the
training gradient clipped to 0.25 (see :class:`~dartsnas.search.architect.VirtualStep`).

``run(RNNSearchConfig(...))`` is the whole job; the command line and the tests call it too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import distributed
from ..config import check
from ..data.text import Corpus, batchify, get_batch
from ..genotype import from_dict
from ..ops.loss import cross_entropy
from ..search.architect import Architect, VirtualStep, call_with
from ..search.diagnostics import rnn_diagnostics
from ..search.early_stop import Tracker, parse_rule
from ..search.hessian import due, search_eigenvalue
from ..search.rnn import RNNSearchModel
from ..settings.search_rnn import RESUMABLE_OVERRIDES, RNNSearchConfig
from . import common
from .common import log_distributed
from .evaluate_rnn import evaluate_sharded, perplexity
from .loop import EpochContext, run_job
from .search_job import SearchJob, SearchResult
from .train_rnn import weight_step

logger = logging.getLogger("dartsnas")

RNNSearchResult = SearchResult  # the earlier name of the same result

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


def make_loss_fn(model: RNNSearchModel) -> Callable[[dict[str, Tensor], TextBatch], Tensor]:
    def loss_fn(params: dict[str, Tensor], batch: TextBatch) -> Tensor:
        # The same masks for every evaluation of this chunk within an alpha step: the virtual step,
        # w' and the two finite-difference points then all differentiate one function of the weights.
        gen = torch.Generator(device=batch.data.device)
        gen.manual_seed(batch.seed)
        out = call_with(model, params, (batch.data, batch.hidden), {"generator": gen})
        batch.hidden_out = out.hidden.detach()
        # The authors' architect uses the plain language-model loss (no TAR) on both batches.
        return cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), batch.targets.reshape(-1))
    return loss_fn


def build_search(cfg: RNNSearchConfig, ntoken: int, device: torch.device, dtype: torch.dtype = torch.float32
                 ) -> tuple[RNNSearchModel, torch.optim.SGD, Architect]:
    """The search model, its weight optimiser (SGD) and the architect (Adam on alpha)."""
    model = RNNSearchModel(ntoken, cfg.emsize, cfg.nhid, cfg.nhidlast, cfg.dropout, cfg.dropouth, cfg.dropoutx,
                           cfg.dropouti, cfg.dropoute, steps=cfg.nodes, primitives=cfg.primitives, compile=cfg.compile
                           ).to(device=device, dtype=dtype)
    model = distributed.convert_sync_bn(model, cfg.sync_bn)
    w_opt = torch.optim.SGD(model.weight_parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=cfg.arch_learning_rate, weight_decay=cfg.arch_weight_decay)
    architect = Architect(
        dict(model.named_weight_parameters()), {"alphas": model.alphas}, make_loss_fn(model), a_opt, w_opt,
        unrolled=cfg.unrolled, hvp=cfg.hvp, hvp_r=cfg.hvp_r,
        # As the authors' rnn/architect.py: plain SGD virtual step, clipped gradient, v clipped, implicit term * eta * c.
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


class RNNSearch(SearchJob):
    """The recurrent search as a job of the epoch loop (:mod:`.loop`)."""

    kind = COMMAND
    command_line = "search rnn"
    nan_hint = "lower --learning_rate or --arch_learning_rate"

    def prepare(self, resume: str | Path | None) -> None:
        distributed.check_sync_bn(self.cfg.sync_bn, self.device)
        _rank_batch(self.cfg)  # fail early when it does not divide

    def build(self, state: dict[str, Any] | None) -> None:
        cfg, device = self.cfg, self.device
        self.corpus = corpus = Corpus(cfg.data)
        # Several processes: the global batch's columns are cut into one block per process, so together
        # they walk through the same streams as one process with the global batch.
        self.batch = batch = _rank_batch(cfg)
        self.train_data = distributed.shard_columns(batchify(corpus.train, batch * distributed.world_size(), device))
        # Alpha batches: the validation set.
        self.search_data = distributed.shard_columns(batchify(corpus.valid, batch * distributed.world_size(), device))
        self.val_data = batchify(corpus.valid, cfg.eval_batch_size, device)
        self.model, self.w_opt, self.architect = build_search(cfg, len(corpus), device)
        assert self.architect.arch_optimizer is not None
        self.a_opt = self.architect.arch_optimizer
        rule = parse_rule(cfg.early_stop)
        self.stopper = Tracker(rule) if rule is not None else None
        if state is not None:
            self.restore(self.model, state["model"])
            self.w_opt.load_state_dict(state["w_optimizer"])
            self.a_opt.load_state_dict(state["a_optimizer"])
            if self.stopper is not None:
                self.stopper.load_state(state.get("early_stop"))
        # The genotype each epoch's diagnostics compare with: the checkpoint's after a resume, else the
        # one the initial alphas derive.
        stored = state.get("genotype") if state is not None else None
        self.previous_genotype = from_dict(stored) if stored is not None else self.model.genotype()

    def describe(self) -> None:
        cfg, corpus = self.cfg, self.corpus
        logger.info("data: %s, %d training and %d validation tokens, vocabulary %d", cfg.data, corpus.train.numel(),
                    corpus.valid.numel(), len(corpus))
        n_params = sum(p.numel() for p in self.model.weight_parameters())
        logger.info("search model: %d weights, %s order on %s", n_params, "second" if cfg.unrolled else "first",
                    self.device)

    def start(self) -> None:
        cfg = self.cfg
        distributed.broadcast_module(self.model)  # the same starting point everywhere
        log_distributed(self.batch, {"learning rate": cfg.learning_rate, "arch learning rate": cfg.arch_learning_rate},
                        unit="batch (streams)")
        if cfg.compile and distributed.is_main():
            logger.info("--compile: the first steps compile the search cell's node kernels (20-40 s, cached for "
                        "later runs)")

    def steps_per_epoch(self) -> int:
        # Chunks are bptt long 95 % of the time (bptt / 2 otherwise): an estimate, for the progress bar.
        return max(1, (self.train_data.shape[0] - 2) // self.cfg.bptt)

    def start_epoch(self, epoch: int) -> dict[str, Any]:
        self.lr = self.w_opt.param_groups[0]["lr"]
        distributed.seed_rank(self.cfg.seed, epoch)
        if self.cfg.hvp_check:
            return _hvp_check(self.model, self.architect, self.train_data, self.search_data, self.cfg, self.lr)
        return {}

    def train_epoch(self, epoch: int, ctx: EpochContext) -> dict[str, Any]:
        cfg, model, train_data, search_data = self.cfg, self.model, self.train_data, self.search_data
        hidden, hidden_valid = model.init_hidden(self.batch), model.init_hidden(self.batch)
        loss_sum, n_batches, i = 0.0, 0, 0
        n_rows = train_data.shape[0]
        while i < n_rows - 2 and ctx.can_step():
            # At least one token: bptt / 2 rounds to 0 for --bptt 1.
            seq_len = max(1, int(cfg.bptt if np.random.random() < 0.95 else cfg.bptt / 2.0))
            data_v, targets_v = get_batch(search_data, i % (search_data.shape[0] - 1), cfg.bptt)
            data, targets = get_batch(train_data, i, seq_len)
            step_lr = self.lr * seq_len / cfg.bptt
            train = TextBatch(data, targets, hidden, _new_seed())
            valid = TextBatch(data_v, targets_v, hidden_valid, _new_seed())
            loss, hidden, hidden_valid = search_step(model, self.w_opt, self.architect, train, valid, step_lr, cfg)
            loss_sum += loss
            n_batches += 1
            i += seq_len
            avg = loss_sum / n_batches
            if ctx.advance(avg, step_loss=loss, lr=step_lr, ppl=perplexity(avg)):
                logger.info("genotype = %s", model.genotype())
        self.loss_sum, self.n_batches = loss_sum, n_batches
        return {}

    def end_epoch(self, epoch: int, finished: bool) -> dict[str, Any]:
        model, loss_sum = self.model, self.loss_sum
        if distributed.is_distributed():
            # Every process must derive the same cell; a mismatch stops the run with one error.
            distributed.check_same(distributed.fingerprint(model.arch_parameters(), str(model.genotype())),
                                   f"the alphas and genotype after epoch {epoch + 1}")
            distributed.average_buffers(model)  # batch-norm running statistics of each process's streams
            loss_sum = distributed.all_reduce_sum([loss_sum])[0] / distributed.world_size()
        train_loss = loss_sum / max(self.n_batches, 1)
        valid_loss = evaluate_sharded(model, self.val_data, self.cfg.bptt, self.cfg.eval_batches)
        self.genotype = model.genotype()
        diagnostics = rnn_diagnostics(self.genotype, self.previous_genotype, model.alphas)
        self.previous_genotype = self.genotype
        return {"train_loss": train_loss, "train_ppl": perplexity(train_loss), "valid_loss": valid_loss,
                "valid_ppl": perplexity(valid_loss), "lr": self.lr, "genotype": self.genotype.to_dict(),
                **diagnostics, **self.curvature(epoch)}

    def curvature(self, epoch: int) -> dict[str, float]:
        """Every --hessian_eig_every epochs, the dominant eigenvalue of the alpha Hessian of the
        validation loss (R-DARTS section 4) on the first alpha chunk, with fresh hidden states and
        dropout masks of a fixed seed: the same batch every time, and no random stream moves."""
        if not due(self.cfg.hessian_eig_every, epoch):
            return {}
        data, targets = get_batch(self.search_data, 0, self.cfg.bptt)
        batch = TextBatch(data, targets, self.model.init_hidden(data.shape[1]), self.cfg.seed)
        return {"hessian_eig": search_eigenvalue(self.architect, self.model, batch, self.cfg.seed)}

    def state(self) -> dict[str, Any]:
        return {**self.search_state(), "w_optimizer": self.w_opt.state_dict(),
                "a_optimizer": self.a_opt.state_dict()}


def resume_config(run_dir: str | Path, overrides: dict[str, Any]) -> RNNSearchConfig:
    """The stored config of the run in ``run_dir`` with the allowed ``overrides`` applied."""
    return common.resume_config(RNNSearchConfig, COMMAND, run_dir, overrides, RESUMABLE_OVERRIDES)


def run(config: RNNSearchConfig | None = None, resume: str | Path | None = None,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> SearchResult:
    """Search a recurrent cell and return the run directory, final genotype and metrics."""
    if resume is not None:
        cfg = (config if config is not None and config.save == str(resume)
               else resume_config(resume, {}))
    else:
        cfg = config if config is not None else RNNSearchConfig()
    return run_job(RNNSearch(cfg), resume, on_epoch_end)


def _rank_batch(cfg: RNNSearchConfig) -> int:
    """This process's number of streams (columns) of both batches."""
    batch = distributed.per_rank_batch(cfg.batch_size, cfg.global_batch)
    check(batch >= 2, f"--global_batch keep leaves {batch} stream(s) per process; the search cell normalises node "
                      f"states over the batch, so each process needs at least 2 (raise --batch_size)")
    return batch


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
