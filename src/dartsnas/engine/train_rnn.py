"""``dartsnas train ptb`` / ``train wt2``: train a recurrent cell from scratch (paper section 3.2).

The AWD-LSTM recipe the paper follows (paper section 3.2, appendix A.2.2): SGD with variable-length back-propagation
through time (the learning rate scaled by ``seq_len / bptt``), gradient-norm clipping, weight
decay, temporal activation regularisation, and the non-monotonically triggered switch to averaged
SGD (NT-ASGD: once the validation loss is worse than the best of all but the last ``nonmono``
epochs). With ASGD active, validation and the saved best model use the averaged weights.

``run(TrainConfig(...))`` is the whole job; the command line and the tests call it too.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import distributed
from ..checkpoint import load_weights, save_weights
from ..config import check, to_dict
from ..data.text import Corpus, batchify, get_batch
from ..genotype import RecurrentGenotype, load_genotype
from ..models.rnn import RNNModel, count_parameters
from ..ops.loss import cross_entropy
from ..rundir import FILE_ONLY, read_json, write_json
from ..settings.train_rnn import (  # noqa: F401 -- the settings' names stay importable from here
    DEFAULT_DATA,
    RESUMABLE_OVERRIDES,
    WT2_DEFAULTS,
    TrainConfig,
    config_from_args,
)
from . import common
from .common import log_distributed, write_figures
from .evaluate_rnn import evaluate, evaluate_sharded, perplexity
from .loop import EpochContext, Job, run_job

logger = logging.getLogger("dartsnas")

COMMAND = "train-rnn"
@dataclass
class TrainResult:
    run_dir: Path
    genotype: RecurrentGenotype
    metrics: list[dict[str, Any]]
    best_valid_loss: float
    test_loss: float | None


# -- pieces shared with the search ---------------------------------------------------------------


def tar_loss(raw_output: Tensor) -> Tensor:
    """Temporal activation regularisation: mean squared change of the cell output between steps."""
    if raw_output.shape[0] < 2:
        return raw_output.new_zeros(())
    return (raw_output[1:] - raw_output[:-1]).pow(2).mean()


def weight_step(model: RNNModel, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], data: Tensor,
                targets: Tensor, hiddens: list[Tensor], lr: float, clip: float, beta: float) -> float:
    """One update of the weights on a (seq_len, batch) chunk, split into ``len(hiddens)`` equal column
    groups whose gradients are accumulated (``--small_batch_size``). Updates ``hiddens`` in place with
    the detached final states and returns the mean cross-entropy."""
    group_lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    B = data.shape[1]
    chunk = B // len(hiddens)
    total = 0.0
    for s in range(len(hiddens)):
        cols = slice(s * chunk, (s + 1) * chunk)
        out = model(data[:, cols], hiddens[s])
        raw = cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), targets[:, cols].reshape(-1))
        loss = raw + beta * tar_loss(out.raw_output) if beta else raw
        # Scaled so that the accumulated gradient equals the gradient of the whole batch.
        (loss * (chunk / B)).backward()
        # Detached: the next chunk of this stream starts from here, but gradients stop at the boundary.
        hiddens[s] = out.hidden.detach()
        total += raw.item() * chunk / B
    # Several processes: the mean gradient over all of them, before it is clipped (no-op in one process).
    distributed.average_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    for g, old in zip(optimizer.param_groups, group_lrs):
        g["lr"] = old
    return total


def sample_seq_len(bptt: int, max_seq_len_delta: int) -> int:
    """AWD-LSTM's variable BPTT length: around bptt (95 %) or bptt / 2, at least 5."""
    base = bptt if np.random.random() < 0.95 else bptt / 2.0
    seq_len = max(5, int(np.random.normal(base, 5)))
    return min(seq_len, bptt + max_seq_len_delta)


# -- the job -------------------------------------------------------------------------------------


def _model_args(cfg: TrainConfig, ntoken: int) -> dict[str, Any]:
    return {"ntoken": ntoken, "ninp": cfg.emsize, "nhid": cfg.nhid, "nhidlast": cfg.nhidlast, "dropout": cfg.dropout,
            "dropouth": cfg.dropouth, "dropoutx": cfg.dropoutx, "dropouti": cfg.dropouti, "dropoute": cfg.dropoute}


def _make_optimizer(kind: str, params: list[Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    if kind == "asgd":
        # t0=0, lambd=0: plain SGD steps with the running average of the iterates (NT-ASGD).
        return torch.optim.ASGD(params, lr=cfg.learning_rate, t0=0, lambd=0.0, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _averaged_state(model: RNNModel, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The model's state_dict with every parameter replaced by its ASGD average."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        ax = optimizer.state.get(p, {}).get("ax")
        if ax is not None:
            state[name] = ax.clone()
    state["decoder.weight"] = state["encoder.weight"]
    return state


class RNNTraining(Job):
    """Training a recurrent cell from scratch as a job of the epoch loop (:mod:`.loop`)."""

    kind = COMMAND
    nan_hint = "lower --learning_rate, or resume from the last checkpoint with --resume RUN_DIR"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.command_line = f"train {cfg.dataset}"

    def run_name(self) -> str:
        return f"train-{self.cfg.dataset}"

    def prepare(self, resume: str | Path | None) -> None:
        _rank_batch(self.cfg)  # fail early when it does not divide
        self.genotype = load_genotype(self.cfg.arch, kind="rnn")

    def build(self, state: dict[str, Any] | None) -> None:
        cfg, device = self.cfg, self.device
        self.corpus = corpus = Corpus(cfg.data_dir, vocab=state["vocab"] if state else None)
        # Several processes: one block of the global batch's columns (streams) per process.
        self.batch = batch = _rank_batch(cfg)
        self.train_data = distributed.shard_columns(batchify(corpus.train, batch * distributed.world_size(), device))
        self.val_data = batchify(corpus.valid, cfg.eval_batch_size, device)
        self.sbs = cfg.small_batch_size or batch
        self.model_args = _model_args(cfg, len(corpus))
        self.model = RNNModel(genotype=self.genotype, packed=cfg.pack_weights, **self.model_args).to(device)
        self.params = list(self.model.parameters())
        self.opt_kind = "sgd"
        self.optimizer = _make_optimizer(self.opt_kind, self.params, cfg)
        self.best_val: list[float] = []
        self.stored_loss = math.inf
        if state is not None:
            self.restore(self.model, state["model"])
            self.opt_kind = state["optimizer_kind"]
            self.optimizer = _make_optimizer(self.opt_kind, self.params, cfg)
            self.optimizer.load_state_dict(state["optimizer"])
            self.best_val, self.stored_loss = list(state["val_losses"]), float(state["stored_loss"])

    def describe(self) -> None:
        cfg, corpus = self.cfg, self.corpus
        assert self.rd is not None
        write_json(self.rd.genotype, self.genotype.to_dict())
        logger.info("genotype = %s", self.genotype)
        logger.info("data: %s, %d / %d / %d tokens, vocabulary %d", cfg.data_dir, corpus.train.numel(),
                    corpus.valid.numel(), corpus.test.numel(), len(corpus))
        logger.info("model: %d parameters on %s", count_parameters(self.model), self.device)

    def start(self) -> None:
        distributed.broadcast_module(self.model)  # the same starting point everywhere
        log_distributed(self.batch, {"learning rate": self.cfg.learning_rate}, unit="batch (streams)")

    def steps_per_epoch(self) -> int:
        # Sequence lengths vary around bptt: an estimate, for the progress bar.
        return max(1, (self.train_data.shape[0] - 2) // self.cfg.bptt)

    def train_epoch(self, epoch: int, ctx: EpochContext) -> dict[str, Any]:
        cfg, model, optimizer = self.cfg, self.model, self.optimizer
        model.train()
        distributed.seed_rank(cfg.seed, epoch)
        hiddens = [model.init_hidden(self.sbs) for _ in range(self.batch // self.sbs)]
        loss_sum, n_batches, i = 0.0, 0, 0
        n_rows = self.train_data.shape[0]
        while i < n_rows - 2 and ctx.can_step():
            seq_len = sample_seq_len(cfg.bptt, cfg.max_seq_len_delta)
            data, targets = get_batch(self.train_data, i, seq_len)
            # Shorter sequences take proportionally smaller steps (AWD-LSTM).
            lr = optimizer.param_groups[0]["lr"] * seq_len / cfg.bptt
            loss = weight_step(model, optimizer, self.params, data, targets, hiddens, lr, cfg.grad_clip, cfg.beta)
            loss_sum += loss
            n_batches += 1
            i += seq_len
            avg = loss_sum / n_batches
            ctx.advance(avg, step_loss=loss, lr=lr, ppl=perplexity(avg))
        if distributed.is_distributed():
            loss_sum = distributed.all_reduce_sum([loss_sum])[0] / distributed.world_size()
        self.train_loss = loss_sum / max(n_batches, 1)
        return {}

    def end_epoch(self, epoch: int, finished: bool) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        if self.opt_kind == "asgd":
            # Validate (and keep) the averaged weights, as the authors' NT-ASGD does.
            current = {k: v.clone() for k, v in model.state_dict().items()}
            averaged = _averaged_state(model, self.optimizer)
            model.load_state_dict(averaged)
            val_loss = evaluate_sharded(model, self.val_data, cfg.bptt, cfg.eval_batches)
            model.load_state_dict(current)
        else:
            val_loss = evaluate_sharded(model, self.val_data, cfg.bptt, cfg.eval_batches)
        improved = val_loss < self.stored_loss
        if improved:
            self.stored_loss = val_loss
        switched = False
        if self.opt_kind == "sgd":
            # Non-monotone trigger: worse than the best of all epochs except the last `nonmono`.
            if len(self.best_val) > cfg.nonmono and val_loss > min(self.best_val[: -cfg.nonmono]):
                self.opt_kind, switched = "asgd", True
                self.optimizer = _make_optimizer("asgd", self.params, cfg)
                logger.info("switching to averaged SGD")
            self.best_val.append(val_loss)
        return {"train_loss": self.train_loss, "train_ppl": perplexity(self.train_loss), "valid_loss": val_loss,
                "valid_ppl": perplexity(val_loss), "lr": cfg.learning_rate, "optimizer": self.opt_kind,
                "switched": switched, "best": improved}

    def write_epoch(self, record: dict[str, Any], finished: bool) -> None:
        assert self.rd is not None
        extra = {"epoch": str(record["epoch"]), "valid_loss": repr(record["valid_loss"])}
        # The weights the epoch validated: the ASGD averages once averaging is on. Right after the
        # switch the new optimiser has no averages yet, and these are the plain weights, as validated.
        weights = _averaged_state(self.model, self.optimizer) if self.opt_kind == "asgd" else self.model.state_dict()
        if record["best"]:
            self._save_weights(self.rd.path / "best.safetensors", weights, extra)
        if finished:
            self._save_weights(self.rd.path / "final.safetensors", weights, extra)

    def _save_weights(self, path: Path, weights: dict[str, Tensor], extra: dict[str, str]) -> None:
        # What `dartsnas test ptb` needs to rebuild the model and read the corpus as it was trained.
        meta = {"model_args": json.dumps(self.model_args), "vocab": json.dumps(self.corpus.vocab), **extra}
        save_weights(path, weights, self.cfg.dataset, self.genotype, to_dict(self.cfg), meta)

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "model_args": self.model_args, "genotype": self.genotype.to_dict(),
                "vocab": self.corpus.vocab, "optimizer": self.optimizer.state_dict(),
                "optimizer_kind": self.opt_kind, "val_losses": self.best_val, "stored_loss": self.stored_loss}

    def finish(self, resumed_finished: bool) -> TrainResult:
        assert self.rd is not None
        cfg, rd = self.cfg, self.rd
        test_loss = None
        test_file, best_path = rd.path / "test.json", rd.path / "best.safetensors"
        if resumed_finished and test_file.is_file():
            test_loss = read_json(test_file).get("test_loss")
        # The best weights are on disk, written by the main process: it alone tests them.
        elif cfg.final_test and distributed.is_main() and best_path.is_file():
            best = load_weights(best_path)
            self.model.load_state_dict(best.state_dict)
            epoch, valid_loss = int(best.meta["epoch"]), float(best.meta["valid_loss"])
            test_data = batchify(self.corpus.test, cfg.test_batch_size, self.device)
            chunks = (test_data.shape[0] - 1 + cfg.bptt - 1) // cfg.bptt
            shown = chunks if cfg.eval_batches is None else min(chunks, cfg.eval_batches)
            logger.info("testing the best model (epoch %d) on %d of %d test chunks (batch %d)", epoch, shown, chunks,
                        cfg.test_batch_size)
            test_loss = evaluate(self.model, test_data, cfg.bptt, cfg.eval_batches)
            logger.info("best model (epoch %d): valid ppl %.2f | test ppl %.2f", epoch, perplexity(valid_loss),
                        perplexity(test_loss))
            write_json(test_file, {"epoch": epoch, "valid_loss": valid_loss, "valid_ppl": perplexity(valid_loss),
                                   "test_loss": test_loss, "test_ppl": perplexity(test_loss),
                                   "test_chunks": shown, "test_chunks_total": chunks})
        logger.info("best valid ppl %.2f%s", perplexity(self.stored_loss),
                    "" if test_loss is None else f" | test ppl {perplexity(test_loss):.2f}", extra=FILE_ONLY)
        logger.info("run directory: %s", rd.path, extra=FILE_ONLY)
        if cfg.plots and distributed.is_main() and not resumed_finished:
            write_figures(rd.path)
        return TrainResult(rd.path, self.genotype, rd.read_metrics(), self.stored_loss, test_loss)


def resume_config(run_dir: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The stored config of the run in ``run_dir`` with the allowed ``overrides`` applied."""
    return common.resume_config(TrainConfig, COMMAND, run_dir, overrides, RESUMABLE_OVERRIDES)


def run(config: TrainConfig | None = None, resume: str | Path | None = None,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train a recurrent cell and return the run directory, metrics and best/test losses.

    Args:
        config: the settings (ignored when ``resume`` is given: the run's stored settings are used).
        resume: a run directory to continue from its last checkpoint.
        on_epoch_end: called as ``on_epoch_end(epoch, record)`` after each epoch's checkpoint.
    """
    if resume is not None:
        cfg = (config if config is not None and config.save == str(resume)
               else resume_config(resume, {}))
    else:
        cfg = config if config is not None else TrainConfig()
    return run_job(RNNTraining(cfg), resume, on_epoch_end)


def _rank_batch(cfg: TrainConfig) -> int:
    """This process's number of streams (columns) of the training batch."""
    batch = distributed.per_rank_batch(cfg.batch_size, cfg.global_batch)
    if cfg.small_batch_size is not None:
        check(batch % cfg.small_batch_size == 0,
              f"--small_batch_size {cfg.small_batch_size} must divide each process's batch of {batch} streams")
    return batch


