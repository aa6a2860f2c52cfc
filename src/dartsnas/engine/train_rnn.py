"""``dartsnas train ptb`` / ``train wt2``: train a recurrent cell from scratch (paper section 3.3).

The AWD-LSTM recipe the paper follows (facts section 5): SGD with variable-length back-propagation
through time (the learning rate scaled by ``seq_len / bptt``), gradient-norm clipping, weight
decay, temporal activation regularisation, and the non-monotonically triggered switch to averaged
SGD (NT-ASGD: once the validation loss is worse than the best of all but the last ``nonmono``
epochs). With ASGD active, validation and the saved best model use the averaged weights.

``run(TrainConfig(...))`` is the whole job; the command line and the tests call it too.
"""

from __future__ import annotations

import argparse
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
from ..config import add_config_arguments, check, coerce, explicit_args, option, read_yaml_config, to_dict
from ..data.text import Corpus, batchify, get_batch
from ..errors import UserError
from ..genotype import RecurrentGenotype, load_genotype
from ..models.rnn import RNNModel, count_parameters
from ..ops.loss import cross_entropy
from ..rundir import RunDir, write_json
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
DEFAULT_DATA = {"ptb": "data/penn", "wt2": "data/wikitext-2"}
# WikiText-2 transfers the PTB cell with these changes (facts section 5); `train wt2` starts from them.
WT2_DEFAULTS: dict[str, Any] = {"dataset": "wt2", "emsize": 700, "nhid": 700, "nhidlast": 700, "dropouth": 0.15,
                                "weight_decay": 5e-7}


@dataclass
class TrainConfig:
    """Settings of a recurrent training run; the defaults are the paper's PTB settings (facts section 5)."""

    arch: str = option("DARTS", "architecture: a name (DARTS = DARTS_V2, DARTS_V1, ENAS), genotype.json, search "
                                "run directory or printed Genotype(recurrent=..., concat=...)")
    dataset: str = option("ptb", "which corpus the run trains on (set by the command)", choices=("ptb", "wt2"),
                          cli=False)
    data: str | None = option(None, "corpus folder with train.txt, valid.txt, test.txt (default: data/penn or "
                                    "data/wikitext-2)")
    emsize: int = option(850, "embedding size")
    nhid: int = option(850, "hidden units of the cell")
    nhidlast: int = option(850, "hidden units of the last layer (equal to nhid: tied weights)")
    learning_rate: float = option(20.0, "initial learning rate", aliases=("--lr",))
    grad_clip: float = option(0.25, "gradient-norm clip", aliases=("--clip",))
    epochs: int = option(8000, "upper epoch limit (the authors train until convergence)")
    batch_size: int = option(64, "batch size")
    small_batch_size: int | None = option(None, "compute the gradient in chunks of this many sequences and "
                                                "accumulate them (same update, less memory); must divide --batch_size")
    bptt: int = option(35, "mean back-propagation-through-time length")
    max_seq_len_delta: int = option(20, "longest sequence: bptt + this")
    dropout: float = option(0.75, "locked dropout on the cell outputs")
    dropouth: float = option(0.25, "dropout on h inside the cell")
    dropoutx: float = option(0.75, "dropout on x inside the cell")
    dropouti: float = option(0.2, "locked dropout on the embeddings")
    dropoute: float = option(0.1, "embedding dropout (whole words)")
    beta: float = option(1e-3, "temporal activation regularisation (slowness) coefficient")
    weight_decay: float = option(8e-7, "weight decay", aliases=("--wdecay",))
    nonmono: int = option(5, "switch to averaged SGD when validation is worse than the best of all but the last "
                             "this many epochs")
    eval_batch_size: int = option(10, "validation batch size")
    test_batch_size: int = option(1, "test batch size")
    seed: int = option(1267, "random seed")
    save: str | None = option(None, "run directory (default: runs/train-<dataset>-<timestamp>)")
    device: str = option("auto", "auto, cpu or cuda")
    threads: int | None = option(None, "CPU threads for PyTorch (default: PyTorch's choice)")
    max_steps: int | None = option(None, "stop after this many steps in total, writing everything a finished "
                                         "run writes (smoke tests, timing)")
    eval_batches: int | None = option(None, "validate on at most this many chunks per epoch (default: all)")
    final_test: bool = option(True, "at the end, report the best model's test perplexity (batch --test_batch_size)")
    report_freq: int = option(200, "log training progress every this many steps")
    tensorboard: bool = option(False, "also write TensorBoard event files (needs the tensorboard package)")
    plots: bool = option(True, "draw figures into the run directory at the end")
    global_batch: str = option("scale", "with several processes (torchrun): scale (each process takes --batch_size "
                                        "streams, the global batch grows) or keep (the global batch stays "
                                        "--batch_size, split over the processes)",
                               choices=distributed.GLOBAL_BATCH_CHOICES)
    pack_weights: bool = option(True, "the cell's weights are packed once per sequence for its products (oneDNN, "
                                      "float32 on the CPU) and their gradient is one product over the whole "
                                      "sequence instead of one per time step: same results within float rounding "
                                      "(--no-pack_weights: one PyTorch product per time step)")

    def validate(self) -> None:
        for name in ("emsize", "nhid", "nhidlast", "epochs", "batch_size", "bptt", "eval_batch_size",
                     "test_batch_size", "report_freq"):
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
        check(self.max_steps is None or self.max_steps >= 1, f"--max_steps must be at least 1, got {self.max_steps}")
        check(self.eval_batches is None or self.eval_batches >= 1,
              f"--eval_batches must be at least 1, got {self.eval_batches}")
        check(self.threads is None or self.threads >= 1, f"--threads must be at least 1, got {self.threads}")

    @property
    def data_dir(self) -> str:
        return self.data or DEFAULT_DATA[self.dataset]


# Settings that may differ when a run is resumed: they do not change the mathematics of past epochs.
RESUMABLE_OVERRIDES = {"device", "threads", "max_steps", "tensorboard", "plots", "report_freq", "data", "epochs",
                       "final_test", "eval_batches", "pack_weights"}


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


# -- command line ---------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace, dataset: str) -> TrainConfig:
    """Defaults < dataset defaults (WikiText-2) < YAML file < flags."""
    values: dict[str, Any] = {"dataset": dataset}
    if dataset == "wt2":
        values.update(WT2_DEFAULTS)
    if args.config:
        values.update(coerce(TrainConfig, read_yaml_config(args.config, TrainConfig), str(args.config)))
    values.update(explicit_args(TrainConfig, args))
    values["dataset"] = dataset
    return TrainConfig(**values)


def _cli(dataset: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        if args.resume:
            if args.config:
                raise UserError("--config cannot be combined with --resume (the run keeps its stored settings)")
            cfg = resume_config(TrainConfig, COMMAND, args.resume, explicit_args(TrainConfig, args),
                                RESUMABLE_OVERRIDES)
            result = run(cfg, resume=args.resume)
        else:
            result = run(config_from_args(args, dataset))
        print(f"best valid ppl {perplexity(result.best_valid_loss):.2f}")
        if result.test_loss is not None:
            print(f"test ppl {perplexity(result.test_loss):.2f}")
        print(f"run directory: {result.run_dir}")
        return 0
    return handler


def add_cli(groups: dict[str, argparse._SubParsersAction], commands: argparse._SubParsersAction) -> None:
    for target, corpus, note in (
        ("ptb", "Penn Treebank", "Defaults are the paper's PTB settings (850 units)."),
        ("wt2", "WikiText-2", ("Defaults are the paper's WikiText-2 settings (700 units, dropouth 0.15, weight decay "
                               "5e-7).")),
    ):
        p = groups["train"].add_parser(
            target, help=f"train a recurrent cell on {corpus}",
            description=f"Train a recurrent cell from scratch on {corpus} with NT-ASGD. {note}",
        )
        p.add_argument("--config", metavar="FILE", help="YAML file (or shipped preset name) of settings; flags win")
        p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
        add_config_arguments(p, TrainConfig)
        p.set_defaults(handler=_cli(target))
