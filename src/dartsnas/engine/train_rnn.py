"""``dartsnas train ptb`` / ``train wt2``: train a recurrent cell from scratch (paper section 3.3).

The AWD-LSTM recipe the paper follows (facts section 5): SGD with variable-length back-propagation
through time (the learning rate scaled by ``seq_len / bptt``), gradient-norm clipping, weight
decay, temporal activation regularisation, and the non-monotonically triggered switch to averaged
SGD (NT-ASGD: once the validation loss is worse than the best of all but the last ``nonmono``
epochs). With ASGD active, validation and the saved best model use the averaged weights.

``run(TrainConfig(...))`` is the whole job; the command line and the tests call it too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import distributed
from ..config import check, to_dict
from ..data.text import Corpus, batchify, get_batch
from ..errors import UserError
from ..genotype import RecurrentGenotype, load_genotype
from ..models.rnn import RNNModel, count_parameters
from ..ops.loss import cross_entropy
from ..rundir import RunDir, write_json
from ..settings.train_rnn import (  # noqa: F401 -- the settings' names stay importable from here
    DEFAULT_DATA,
    RESUMABLE_OVERRIDES,
    WT2_DEFAULTS,
    TrainConfig,
    config_from_args,
)
from ..utils import rng_state, seed_everything, set_rng_state
from .common import (
    FORMAT_VERSION,
    TensorBoard,
    load_checkpoint,
    log_distributed,
    open_run_dir,
    progress,
    resume_config,
    run_logging,
    save_checkpoint,
    write_figures,
)
from .evaluate_rnn import CHECKPOINT_KIND, evaluate, evaluate_sharded, perplexity

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
               else resume_config(TrainConfig, COMMAND, resume, {}, RESUMABLE_OVERRIDES))
    else:
        cfg = config if config is not None else TrainConfig()
    cfg.validate()
    device = distributed.setup(cfg.device)
    _rank_batch(cfg)  # fail early when it does not divide
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    genotype = load_genotype(cfg.arch, kind="rnn")
    rd = open_run_dir(resume if resume is not None else cfg.save, f"train-{cfg.dataset}", resume is not None)
    cfg = dataclasses.replace(cfg, save=str(rd.path))
    with run_logging(rd):
        return _run(cfg, genotype, rd, device, resume is not None, on_epoch_end)


def _rank_batch(cfg: TrainConfig) -> int:
    """This process's number of streams (columns) of the training batch."""
    batch = distributed.per_rank_batch(cfg.batch_size, cfg.global_batch)
    if cfg.small_batch_size is not None:
        check(batch % cfg.small_batch_size == 0,
              f"--small_batch_size {cfg.small_batch_size} must divide each process's batch of {batch} streams")
    return batch


def _run(cfg: TrainConfig, genotype: RecurrentGenotype, rd: RunDir, device: torch.device, resuming: bool,
         on_epoch_end: Callable[[int, dict[str, Any]], None] | None) -> TrainResult:
    seed_everything(cfg.seed)
    state = load_checkpoint(rd.checkpoint, COMMAND) if resuming else None
    corpus = Corpus(cfg.data_dir, vocab=state["vocab"] if state else None)
    # Several processes: one block of the global batch's columns (streams) per process.
    batch = _rank_batch(cfg)
    train_data = distributed.shard_columns(batchify(corpus.train, batch * distributed.world_size(), device))
    val_data = batchify(corpus.valid, cfg.eval_batch_size, device)
    sbs = cfg.small_batch_size or batch

    model_args = _model_args(cfg, len(corpus))
    model = RNNModel(genotype=genotype, packed=cfg.pack_weights, **model_args).to(device)
    params = list(model.parameters())
    opt_kind = "sgd"
    optimizer = _make_optimizer(opt_kind, params, cfg)
    start_epoch, step, stored_loss = 0, 0, math.inf
    best_val: list[float] = []
    if state is not None:
        model.load_state_dict(state["model"])
        opt_kind = state["optimizer_kind"]
        optimizer = _make_optimizer(opt_kind, params, cfg)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_epoch, step = state["epoch"], state["step"]
        best_val, stored_loss = list(state["val_losses"]), float(state["stored_loss"])
        if distributed.is_main():
            rd.truncate_metrics(start_epoch)
        logger.info("resuming %s after epoch %d (step %d, %s)", rd.path, start_epoch, step, opt_kind.upper())
        if state.get("finished"):
            logger.info("run in %s already finished; nothing to do", rd.path)
            return TrainResult(rd.path, genotype, rd.read_metrics(), stored_loss, state.get("test_loss"))
    elif distributed.is_main():
        rd.write_config(to_dict(cfg), COMMAND)
        write_json(rd.genotype, genotype.to_dict())
        logger.info("config %s", to_dict(cfg))
        logger.info("genotype = %s", genotype)
        logger.info("data: %s, %d / %d / %d tokens, vocabulary %d", cfg.data_dir, corpus.train.numel(),
                    corpus.valid.numel(), corpus.test.numel(), len(corpus))
        logger.info("model: %d parameters on %s", count_parameters(model), device)
    distributed.broadcast_module(model)  # the same starting point everywhere
    log_distributed(batch, {"learning rate": cfg.learning_rate}, unit="batch (streams)")

    def checkpoint(path: Path, kind: str, weights: dict[str, Tensor], **extra: Any) -> None:
        if not distributed.is_main():  # one writer of the run directory
            return
        save_checkpoint(path, {"format_version": FORMAT_VERSION, "kind": kind, "model": weights,
                               "model_args": model_args, "genotype": genotype.to_dict(), "vocab": corpus.vocab,
                               "config": to_dict(cfg), **extra})

    best_path = rd.path / "checkpoints" / "best.pt"
    tb = TensorBoard(rd.path / "tb") if cfg.tensorboard and distributed.is_main() else None
    finished = False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            distributed.seed_rank(cfg.seed, epoch)
            hiddens = [model.init_hidden(sbs) for _ in range(batch // sbs)]
            loss_sum, n_batches, i = 0.0, 0, 0
            n_rows = train_data.shape[0]
            bar = progress(n_rows // cfg.bptt, f"epoch {epoch + 1}")
            while i < n_rows - 2 and (cfg.max_steps is None or step < cfg.max_steps):
                seq_len = sample_seq_len(cfg.bptt, cfg.max_seq_len_delta)
                data, targets = get_batch(train_data, i, seq_len)
                # Shorter sequences take proportionally smaller steps (AWD-LSTM).
                lr = optimizer.param_groups[0]["lr"] * seq_len / cfg.bptt
                loss = weight_step(model, optimizer, params, data, targets, hiddens, lr, cfg.grad_clip, cfg.beta)
                if not math.isfinite(loss):
                    raise UserError(f"the training loss became {loss} at step {step + 1}; lower --learning_rate, or "
                                    f"resume from the last checkpoint with --resume {rd.path}")
                loss_sum += loss
                n_batches += 1
                step += 1
                i += seq_len
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / n_batches:.3f}")
                if n_batches % cfg.report_freq == 0:
                    avg = loss_sum / n_batches
                    logger.info("epoch %d step %d loss %.4f ppl %.2f", epoch + 1, n_batches, avg, perplexity(avg))
            bar.close()
            if distributed.is_distributed():
                loss_sum = distributed.all_reduce_sum([loss_sum])[0] / distributed.world_size()
            train_loss = loss_sum / max(n_batches, 1)
            if opt_kind == "asgd":
                # Validate (and keep) the averaged weights, as the authors' NT-ASGD does.
                current = {k: v.clone() for k, v in model.state_dict().items()}
                averaged = _averaged_state(model, optimizer)
                model.load_state_dict(averaged)
                val_loss = evaluate_sharded(model, val_data, cfg.bptt, cfg.eval_batches)
                model.load_state_dict(current)
                weights = averaged
            else:
                val_loss = evaluate_sharded(model, val_data, cfg.bptt, cfg.eval_batches)
                weights = model.state_dict()
            improved = val_loss < stored_loss
            if improved:
                stored_loss = val_loss
                checkpoint(best_path, CHECKPOINT_KIND, weights, epoch=epoch + 1, valid_loss=val_loss)
            switched = False
            if opt_kind == "sgd":
                # Non-monotone trigger: worse than the best of all epochs except the last `nonmono`.
                if len(best_val) > cfg.nonmono and val_loss > min(best_val[: -cfg.nonmono]):
                    opt_kind, switched = "asgd", True
                    optimizer = _make_optimizer("asgd", params, cfg)
                    logger.info("switching to averaged SGD")
                best_val.append(val_loss)
            finished = epoch + 1 == cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)
            record: dict[str, Any] = {
                "epoch": epoch + 1, "step": step, "train_loss": train_loss, "train_ppl": perplexity(train_loss),
                "valid_loss": val_loss, "valid_ppl": perplexity(val_loss), "lr": cfg.learning_rate,
                "optimizer": opt_kind, "switched": switched, "best": improved, "time": time.perf_counter() - t0,
            }
            logger.info("epoch %d train_loss %.4f valid_loss %.4f valid_ppl %.2f%s (%.1f s)", epoch + 1, train_loss,
                        val_loss, record["valid_ppl"], " *" if improved else "", record["time"])
            if distributed.is_main():
                rd.append_metrics(record)
            checkpoint(rd.checkpoint, COMMAND, model.state_dict(), epoch=epoch + 1, step=step, finished=finished,
                       optimizer=optimizer.state_dict(), optimizer_kind=opt_kind, val_losses=best_val,
                       stored_loss=stored_loss, rng=rng_state())
            if tb is not None:
                tb.log(record, epoch + 1)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
            if finished:
                break
    finally:
        if tb is not None:
            tb.close()

    test_loss = None
    # The best weights are on disk, written by the main process: it alone tests them.
    if cfg.final_test and distributed.is_main() and best_path.is_file():
        best = load_checkpoint(best_path)
        model.load_state_dict(best["model"])
        test_data = batchify(corpus.test, cfg.test_batch_size, device)
        test_loss = evaluate(model, test_data, cfg.bptt)
        logger.info("best model (epoch %d): valid ppl %.2f | test ppl %.2f", best["epoch"],
                    perplexity(best["valid_loss"]), perplexity(test_loss))
        write_json(rd.path / "test.json", {"epoch": best["epoch"], "valid_loss": best["valid_loss"],
                                           "valid_ppl": perplexity(best["valid_loss"]), "test_loss": test_loss,
                                           "test_ppl": perplexity(test_loss)})
    logger.info("run directory: %s", rd.path)
    if cfg.plots and distributed.is_main():
        write_figures(rd.path)
    distributed.barrier()  # the run directory is complete when run() returns in any process
    return TrainResult(rd.path, genotype, rd.read_metrics(), stored_loss, test_loss)
