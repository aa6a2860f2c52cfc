"""The one epoch loop behind every ``search`` and ``train`` command.

A run goes through the same life whatever it trains: checks that need no run directory, the run
directory and its log, a new start or a resume from ``checkpoints/last.pt``, epochs (steps, a
progress bar, the step log, the interruption hint, an evaluation, a metrics line, a checkpoint, TensorBoard),
and an end that writes the run's results. :func:`run_job` owns all of that; a :class:`Job` supplies
only what differs between the four jobs: what it builds, one epoch of steps, one evaluation, what
its checkpoint holds and what it writes at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import distributed
from ..checkpoint import FORMAT_VERSION, load_checkpoint, load_into, save_checkpoint
from ..config import to_dict
from ..errors import UserError
from ..rundir import RunDir, console_filter
from ..utils import is_tty, rng_state, seed_everything, set_rng_state
from .common import TensorBoard, open_run_dir, run_logging

logger = logging.getLogger("dartsnas")

OnEpochEnd = Callable[[int, dict[str, Any]], None]


class StepLog:
    """``steps.jsonl`` (``--log_steps``): one line per training step, flushed as it is written, so that
    every step a checkpoint covers is on disk before that checkpoint; a resume cuts the file back to the
    checkpoint's step (:meth:`RunDir.truncate_steps`), so no step is lost or written twice. With
    TensorBoard on, the same values also go there as ``step/loss`` and ``step/lr``."""

    def __init__(self, path: Path, tb: TensorBoard | None):
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- open for the run; the loop closes it
        self._tb = tb

    def write(self, step: int, epoch: int, loss: float | None, lr: float | None) -> None:
        record = {"step": step, "epoch": epoch + 1, "loss": loss, "lr": lr}
        self._file.write(json.dumps({k: v for k, v in record.items() if v is not None}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key in ("loss", "lr"):
                if record[key] is not None:
                    self._tb.writer.add_scalar(f"step/{key}", record[key], step)

    def close(self) -> None:
        self._file.close()


@dataclasses.dataclass
class RunProgress:
    """What the progress lines need to say how far the whole run is: its expected number of steps, and
    the time and step at which this process started training (a resumed run counts from its resume)."""

    total: int
    start_step: int
    start_time: float = dataclasses.field(default_factory=time.perf_counter)

    def describe(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0 or step >= self.total:
            return f"run step {step}/{self.total}"
        left = (time.perf_counter() - self.start_time) / done * (self.total - step)
        return f"run step {step}/{self.total}, about {_eta(left)} left"


class EpochContext:
    """What a job's epoch sees of the loop: the step budget and the one call made after each step.

    ``advance`` counts the step, moves the progress bar, stops the run with one line when the
    running loss is not finite, writes the step's line of ``steps.jsonl`` (``--log_steps``), and logs a
    progress line every ``report_freq`` steps.
    """

    def __init__(self, epoch: int, step: int, limit: int | None, total: int, report_freq: int, nan_hint: str,
                 bar: tqdm, steps: StepLog | None = None, progress: RunProgress | None = None):
        self.epoch = epoch
        self.step = step
        # Steps this epoch may still take under --max_steps and --limit_train_batches (None: no limit).
        self.limit = limit
        self.total = total  # steps this epoch is expected to take (the bar's length)
        self.taken = 0
        self._report_freq = report_freq
        self._nan_hint = nan_hint
        self._bar = bar
        self._steps = steps
        self._progress = progress

    def can_step(self) -> bool:
        return self.limit is None or self.taken < self.limit

    def advance(self, running_loss: float, *, step_loss: float | None = None, lr: float | None = None,
                **shown: float) -> bool:
        """Count one step; ``step_loss`` and ``lr`` are this step's own, for ``steps.jsonl``. Returns True
        when this step logged a progress line."""
        self.step += 1
        self.taken += 1
        if not math.isfinite(running_loss):
            raise UserError(f"the training loss became {running_loss} at step {self.step}; {self._nan_hint}")
        if self._steps is not None:
            self._steps.write(self.step, self.epoch, step_loss, lr)
        values = {"loss": running_loss, **shown}
        self._bar.update(1)
        self._bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()}, refresh=False)
        if self.taken % self._report_freq:
            return False
        run = f" ({self._progress.describe(self.step)})" if self._progress is not None else ""
        logger.info("epoch %d step %d/%d%s %s", self.epoch + 1, self.taken, self.total, run,
                    " ".join(f"{k} {v:.4f}" for k, v in values.items()))
        return True


class Job:
    """One command's part of a run. Subclasses set ``kind`` and override the hooks they need.

    The loop calls, in order: :meth:`prepare` (before the run directory exists: everything that can
    fail on bad input), :meth:`build` (data, model, optimisers; restores a checkpoint's state),
    :meth:`describe` (new runs only), :meth:`start` (both), then per epoch :meth:`train_epoch`,
    :meth:`end_epoch`, :meth:`write_epoch`, :meth:`state`, and at the end :meth:`finish`.
    """

    kind: str = ""  # the command stored in config.yaml and in checkpoints ("search-cnn", ...)
    command_line: str = ""  # how a user starts it ("search cnn"), for the resume hint
    nan_hint: str = "lower --learning_rate"

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.device = torch.device("cpu")
        self.rd: RunDir | None = None

    # -- before the run directory ---------------------------------------------------------------
    def prepare(self, resume: str | Path | None) -> None:
        """Checks that need no run directory (devices, batch splits, data layout)."""

    def run_name(self) -> str:
        """The default run directory's prefix."""
        return self.kind

    # -- the run --------------------------------------------------------------------------------
    def build(self, state: dict[str, Any] | None) -> None:
        raise NotImplementedError

    def restore(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint's weights into ``module``, or stop with one line if they do not fit (a
        damaged run directory, or changed data that changes the network's shape)."""
        assert self.rd is not None
        load_into(module, weights, f"the checkpoint {self.rd.checkpoint}",
                  fix="it belongs to another network: resume with the data the run was started with")

    def describe(self) -> None:
        """Log what a new run trains (data, network)."""

    def start(self) -> None:
        """Work after building, for new and resumed runs alike (broadcasts, notices)."""

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> dict[str, Any]:
        """Per-epoch set-up; returns the first entries of the epoch's record."""
        return {}

    def train_epoch(self, epoch: int, ctx: EpochContext) -> dict[str, Any]:
        raise NotImplementedError

    def end_epoch(self, epoch: int, finished: bool) -> dict[str, Any]:
        """Combine processes' statistics, step schedules, evaluate; returns more of the record."""
        return {}

    def stop_reason(self, epoch: int, record: dict[str, Any]) -> str | None:
        """Why the run should end after this epoch although epochs remain (early stopping), or None.
        The loop then treats the epoch as the last one and records the reason as ``stopped``."""
        return None

    def log_epoch(self, record: dict[str, Any], finished: bool) -> None:
        """Extra log lines after the epoch's summary (a search's genotype)."""

    def write_epoch(self, record: dict[str, Any], finished: bool) -> None:
        """Files of this epoch besides the metrics line and the checkpoint (main process only). Called
        after the epoch's checkpoint, and again on resume if a kill came in between: it may use only
        ``record`` and the state that the checkpoint restores."""

    def state(self) -> dict[str, Any]:
        """The job's part of the resumable checkpoint."""
        raise NotImplementedError

    def finish(self, resumed_finished: bool) -> Any:
        """Write the run's results and return them. ``resumed_finished``: a finished run was resumed,
        so only results missing from the run directory are computed."""
        raise NotImplementedError


def settings_block(cfg: Any) -> str:
    """A run's settings as an aligned block, three per line, for the start of its log."""
    items = [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in to_dict(cfg).items()]
    # Long values (lists of names) get lines of their own, so that they do not widen every column.
    short, long = [s for s in items if len(s) <= 40], [s for s in items if len(s) > 40]
    width = max((len(s) for s in short), default=0) + 2
    rows = ["  " + "".join(s.ljust(width) for s in short[i:i + 3]).rstrip() for i in range(0, len(short), 3)]
    return "settings:\n" + "\n".join(rows + ["  " + s for s in long])


def _eta(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@contextlib.contextmanager
def _bar(total: int, desc: str) -> Iterator[tqdm]:
    """A per-epoch bar on interactive terminals; silent in logs, CI and captured output, and in every
    process but the main one. Closed however the epoch ends, so that the interruption hint is not
    glued onto it."""
    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
               disable=not is_tty() or not distributed.is_main())
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def _logs_around_bars() -> Iterator[None]:
    """Route the package's console log lines through tqdm, so they print above a bar, not onto it."""
    if not is_tty():
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=[logger]):
        for handler in logger.handlers:  # tqdm's console handlers replace ours without their filter
            if not isinstance(handler, logging.FileHandler):
                handler.addFilter(console_filter)
        yield


def run_job(job: Job, resume: str | Path | None = None, on_epoch_end: OnEpochEnd | None = None) -> Any:
    """Run ``job`` from its config (or continue the run directory ``resume``) and return its result."""
    cfg = job.cfg
    cfg.validate()
    job.device = distributed.setup(cfg.device)
    job.prepare(resume)
    if getattr(cfg, "tensorboard", False):
        _require_tensorboard()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    target = resume if resume is not None else cfg.save
    existed = target is not None and Path(target).exists()
    rd = open_run_dir(target, job.run_name(), resume is not None, job.kind)
    job.rd = rd
    job.cfg = dataclasses.replace(cfg, save=str(rd.path))
    started = False
    try:
        with run_logging(rd), _logs_around_bars():
            try:
                seed_everything(job.cfg.seed)
                # A run directory without a checkpoint (stopped in its first epoch) restarts in place.
                state = load_checkpoint(rd.checkpoint, job.kind) if rd.checkpoint.exists() else None
                try:
                    job.build(state)
                    started = True
                    return _drive(job, rd, state, on_epoch_end)
                except KeyError as exc:
                    if state is None or exc.args[0] in state:
                        raise
                    raise UserError(f"{rd.checkpoint} lacks {exc.args[0]!r}; the run directory is damaged: resume "
                                    f"from a copy or start a new run") from None
            except KeyboardInterrupt:
                if rd.checkpoint.exists() and distributed.is_main():
                    logger.warning("interrupted; continue with: dartsnas %s --resume %s", job.command_line, rd.path)
                raise
    except BaseException:
        # A new run that failed before its first step leaves nothing behind (its log included), unless
        # the folder was there before: nothing the user made is removed.
        if not started and resume is None and not existed and distributed.is_main():
            rd.unlock()
            shutil.rmtree(rd.path, ignore_errors=True)
        raise
    finally:
        rd.unlock()


def _require_tensorboard() -> None:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise UserError('--tensorboard needs the tensorboard package: pip install "dartsnas[tensorboard]"') from None


def _drive(job: Job, rd: RunDir, state: dict[str, Any] | None, on_epoch_end: OnEpochEnd | None) -> Any:
    cfg = job.cfg
    start_epoch, step = 0, 0
    if state is not None:
        set_rng_state(state["rng"])
        start_epoch, step = state["epoch"], state["step"]
        if distributed.is_main():
            rd.truncate_metrics(start_epoch)
            rd.truncate_steps(step)
            _rebuild_records(job, rd, state)
        # Done by the limits in force now: a resume may raise --max_steps (or, where the schedule allows
        # it, --epochs) and the run goes on from its last epoch.
        stopped = isinstance(state.get("record"), dict) and "stopped" in state["record"]
        if start_epoch >= cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps) or stopped:
            logger.info("run in %s already finished after epoch %d (step %d); completing its results", rd.path,
                        start_epoch, step)
            return job.finish(resumed_finished=True)
        logger.info("resuming %s after epoch %d (step %d)", rd.path, start_epoch, step)
    elif distributed.is_main():
        rd.truncate_metrics(0)  # records of an earlier start that never wrote a checkpoint
        rd.truncate_steps(0)
        rd.write_config(to_dict(cfg), job.kind)
        logger.info("%s", settings_block(cfg))
        job.describe()
    job.start()
    if getattr(cfg, "plots", False) and distributed.is_main():
        missing = [name for name in ("matplotlib", "PIL") if importlib.util.find_spec(name) is None]
        if missing:
            logger.warning('figures will be skipped: %s not installed (pip install "dartsnas[viz]")',
                           " and ".join("Pillow" if m == "PIL" else m for m in missing))

    main = distributed.is_main()
    tb = TensorBoard(rd.path / "tb", step) if cfg.tensorboard and main else None
    steps_log = StepLog(rd.steps, tb) if cfg.log_steps and main else None
    progress = RunProgress(_run_steps(cfg, job.steps_per_epoch()), step)
    epoch_times: list[float] = []
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            record: dict[str, Any] = {"epoch": epoch + 1, **job.start_epoch(epoch)}
            limit = _epoch_limit(cfg, step)
            total = job.steps_per_epoch() if limit is None else min(job.steps_per_epoch(), limit)
            with _bar(total, f"epoch {epoch + 1}/{cfg.epochs}") as bar:
                ctx = EpochContext(epoch, step, limit, total, cfg.report_freq, job.nan_hint, bar, steps_log, progress)
                record.update(job.train_epoch(epoch, ctx))
            step = ctx.step
            finished = epoch + 1 == cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)
            record.update(job.end_epoch(epoch, finished))
            reason = None if finished else job.stop_reason(epoch, record)
            if reason is not None:
                finished = True
                record["stopped"] = reason
                logger.info("stopping after epoch %d: %s", epoch + 1, reason)
            record["step"] = step
            record["time"] = time.perf_counter() - t0
            state = {"format_version": FORMAT_VERSION, "kind": job.kind, "epoch": epoch + 1, "step": step,
                     "finished": finished, "rng": rng_state(), "config": to_dict(cfg), "record": record,
                     **job.state()}
            # Nothing non-finite is ever reported or checkpointed: the last good checkpoint stays.
            _check_finite(record, state, epoch, step, rd)
            epoch_times.append(record["time"])
            _log_epoch(record, cfg, epoch, step, epoch_times, finished)
            job.log_epoch(record, finished)
            if distributed.is_main():
                # The checkpoint first: the epoch's records can be rebuilt from it, not the reverse.
                save_checkpoint(rd.checkpoint, state)
                job.write_epoch(record, finished)
                rd.append_metrics(record)
            if tb is not None:
                tb.log(record, epoch + 1)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
            if finished:
                break
    finally:
        if steps_log is not None:
            steps_log.close()
        if tb is not None:
            tb.close()
    distributed.barrier()  # every epoch's files are written before any process reads them back
    result = job.finish(resumed_finished=False)
    distributed.barrier()  # the run directory is complete when run() returns in any process
    return result


def _epoch_limit(cfg: Any, step: int) -> int | None:
    """The most steps the next epoch may take: what --max_steps leaves of the run, and --limit_train_batches."""
    limits = [n for n in (None if cfg.max_steps is None else cfg.max_steps - step, cfg.limit_train_batches)
              if n is not None]
    return min(limits) if limits else None


def _run_steps(cfg: Any, steps_per_epoch: int) -> int:
    """The steps the whole run is expected to take (an estimate where epochs vary in length)."""
    per_epoch = steps_per_epoch if cfg.limit_train_batches is None else min(steps_per_epoch, cfg.limit_train_batches)
    total = per_epoch * cfg.epochs
    return total if cfg.max_steps is None else min(total, cfg.max_steps)


def _non_finite(value: Any, name: str) -> str | None:
    """The name of the first non-finite number or tensor entry in ``value``, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else name
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            return None if bool(torch.isfinite(value).all()) else name
        return None
    if isinstance(value, dict):
        return next((bad for k, v in value.items() if (bad := _non_finite(v, f"{name}.{k}" if name else str(k)))),
                    None)
    if isinstance(value, (list, tuple)):
        return next((bad for i, v in enumerate(value) if (bad := _non_finite(v, f"{name}[{i}]"))), None)
    return None


def _check_finite(record: dict[str, Any], state: dict[str, Any], epoch: int, step: int, rd: RunDir) -> None:
    """Stop the run with one line when its record or checkpoint would hold a NaN or an infinity
    (weights, alphas, batch-norm statistics, optimiser state, losses)."""
    # The ASGD switch's best-of-all comparison may hold inf before any epoch finished; a stored
    # best loss of inf is a start value, not a result.
    bad = _non_finite(record, "") or _non_finite({k: v for k, v in state.items() if k != "stored_loss"}, "")
    if bad is None:
        return
    last = (f"the last good checkpoint, {rd.checkpoint} (epoch {epoch}), is kept" if epoch and rd.checkpoint.exists()
            else "no checkpoint was written")
    raise UserError(f"epoch {epoch + 1} (step {step}) produced a non-finite value ({bad}); nothing of it was saved, "
                    f"{last}; lower the learning rates and start again")


def _rebuild_records(job: Job, rd: RunDir, state: dict[str, Any]) -> None:
    """Write the records of the checkpoint's epoch if a kill came between the checkpoint and them."""
    record = state.get("record")
    if not isinstance(record, dict) or any(m.get("epoch") == state["epoch"] for m in rd.read_metrics()):
        return
    logger.info("rebuilding the records of epoch %d from its checkpoint", state["epoch"])
    job.write_epoch(record, bool(state.get("finished")))
    rd.append_metrics(record)


def _log_epoch(record: dict[str, Any], cfg: Any, epoch: int, step: int, times: list[float], finished: bool) -> None:
    """One summary line per epoch: its losses and accuracies, its time and the run's remaining time."""
    shown = " ".join(f"{k} {v:.4f}" for k, v in record.items()
                     if k.endswith(("_loss", "_acc", "_ppl")) and isinstance(v, (int, float)))
    eta = ""
    if not finished:
        per_epoch = sum(times) / len(times)
        epochs_left = cfg.epochs - epoch - 1
        if cfg.max_steps is not None and step > 0:
            # Under --max_steps the run ends when the steps run out, possibly before the last epoch.
            steps_per_epoch = max(step / (epoch + 1), 1.0)
            epochs_left = min(epochs_left, math.ceil((cfg.max_steps - step) / steps_per_epoch))
        eta = f", about {_eta(per_epoch * epochs_left)} left"
    logger.info("epoch %d/%d %s (%.1f s%s)", epoch + 1, cfg.epochs, shown, record["time"], eta)
