"""Pieces the jobs share: the run directory and its log, resumed settings, TensorBoard, figures, search records."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..config import coerce, field_names, from_dict
from ..errors import UserError
from ..genotype import CNN_PRIMITIVES, RNN_PRIMITIVES
from ..rundir import FILE_ONLY, RunDir, default_run_dir, write_json

logger = logging.getLogger("dartsnas")


def open_run_dir(path: str | Path | None, name: str, resume: bool, kind: str | None = None) -> RunDir:
    """Create (or reopen, when resuming) and lock the run directory of a ``kind`` run; ``None`` picks
    ``runs/<name>-<time>``.

    With several processes only the main one creates and locks it, and every process gets its path
    (the default name holds a timestamp, which could differ between processes).
    """
    made: list[RunDir] = []

    def create() -> str:
        rd = RunDir(path if path is not None else default_run_dir(name))
        rd.create(resume=resume, command=kind)
        made.append(rd)
        return str(rd.path)
    where = distributed.on_main(create)
    return made[0] if made else RunDir(where)


def run_logging(rd: RunDir) -> contextlib.AbstractContextManager[Any]:
    """The run's stdout + ``log.txt`` log in the main process; other processes log warnings only
    (Python's last-resort handler prints them to stderr)."""
    return rd.logging() if distributed.is_main() else contextlib.nullcontext()


def log_distributed(per_rank_batch: int, learning_rates: dict[str, float], unit: str = "batch") -> None:
    """Report the global batch and the (unscaled) learning rates of a run with several processes."""
    if not distributed.is_distributed():
        return
    rates = ", ".join(f"{name} {value:g}" for name, value in learning_rates.items())
    logger.info("distributed: %d processes (%s backend), %s; %s (the same as given: learning rates are not "
                "scaled with the global batch)", distributed.world_size(), torch.distributed.get_backend(),
                distributed.describe_batch(per_rank_batch, unit), rates)


class TensorBoard:
    """Scalars of each epoch record as TensorBoard events (optional dependency)."""

    def __init__(self, path: Path, step: int = 0):
        """``step``: the run's global step at its checkpoint (0 for a new run). Events a killed process
        wrote after it are repeated by the resumed one, so TensorBoard is told to drop every event from
        step + 1 on (``purge_step``); epoch events are numbered by epoch, which never exceeds the
        global step, so the epochs the checkpoint covers stay."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(str(path), purge_step=step + 1)

    def log(self, record: dict[str, Any], step: int) -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def write_figures(run_dir: Path) -> list[Path]:
    """Draw the run's figures; plotting problems are warnings, never a failed run."""
    try:
        from ..viz import finalize_run
    except ImportError as exc:
        logger.warning("figures skipped: %s (pip install 'dartsnas[viz]')", exc)
        return []
    try:
        files = list(finalize_run(run_dir))
    except Exception as exc:  # noqa: BLE001 -- a figure must never cost the user a finished run
        logger.warning("figures skipped: %s", exc)
        return []
    if files:
        logger.info("figures: %s", ", ".join(str(f) for f in files))
    return files


def resume_config(cls: type, command: str, run_dir: str | Path, overrides: dict[str, Any],
                  resumable: set[str]) -> Any:
    """The stored config of ``run_dir`` (a run of ``command``) with the allowed ``overrides`` applied.

    Settings outside ``resumable`` change the mathematics, so they may not differ from the stored run.
    """
    rd = RunDir(run_dir)
    if not rd.checkpoint.is_file() and not rd.config.is_file():
        raise UserError(f"{run_dir} has neither checkpoints/last.pt nor config.yaml to resume from; start a new run "
                        f"instead")
    stored = rd.read_config()
    if stored.get("command") != command:
        raise UserError(f"{run_dir} is a {stored.get('command')!r} run, not a {command!r} run; resume it with its "
                        f"own command")
    # Types checked as for a settings file: a hand-edited or damaged config.yaml is one line, not a crash.
    cfg = from_dict(cls, coerce(cls, {k: v for k, v in stored["config"].items() if k in field_names(cls)},
                                str(rd.config)))
    changes = {}
    for key, value in overrides.items():
        if key == "save" or getattr(cfg, key, value) == value:
            continue
        if key not in resumable:
            raise UserError(f"--{key} cannot change when resuming (the run uses {getattr(cfg, key)!r}); "
                            f"start a new run to change it")
        changes[key] = value
    return dataclasses.replace(cfg, **changes, save=str(run_dir))


def write_search_epoch(rd: RunDir, model: Any, genotype: Any, record: dict[str, Any]) -> None:
    """A search epoch's files besides its metrics line: its derived genotype and its softmaxed alphas
    (the material of the progress animations and alpha plots)."""
    epoch = record["epoch"]
    write_json(rd.path / "genotypes" / f"epoch_{epoch:03d}.json", genotype.to_dict())
    write_json(rd.path / "alphas" / f"epoch_{epoch:03d}.json",
               {"primitives": list(model.primitives), **model.arch_weights()})


def finish_search(rd: RunDir, genotype: Any, primitives: Sequence[str], plots: bool) -> None:
    """Write the final genotype, say where the run is, and draw its figures. A search over another
    operation set than the default one records that set in genotype.json too."""
    default = CNN_PRIMITIVES if genotype.kind == "cnn" else RNN_PRIMITIVES
    extra = {} if tuple(primitives) == default else {"primitives": list(primitives)}
    write_json(rd.genotype, {**genotype.to_dict(), **extra})
    # The command prints both lines as its result; the log file keeps them too.
    logger.info("final genotype = %s", genotype, extra=FILE_ONLY)
    logger.info("run directory: %s", rd.path, extra=FILE_ONLY)
    if plots:
        write_figures(rd.path)


def data_record(source: str, data: Any) -> dict[str, Any]:
    """What a run trained on, as its checkpoint, ``data.json`` and weights record it: the class count and
    names that size the classifier, the input, and the normalisation ``dartsnas test`` must repeat
    (None where a Python Dataset normalises its own items). ``source``: the --dataset, or "python"."""
    mean, std = getattr(data, "mean", None), getattr(data, "std", None)
    return {"source": source, "name": data.name, "num_classes": data.num_classes, "classes": data.classes,
            "in_channels": data.in_channels, "image_size": list(data.image_size),
            "mean": list(mean) if mean is not None else None, "std": list(std) if std is not None else None}


def check_resumed_source(state: dict[str, Any] | None, python: bool) -> None:
    """A run started on a Python Dataset resumes only with one, and a run started on its --dataset only with
    that (checked before any data is loaded)."""
    stored = state.get("data") if state is not None else None
    if not isinstance(stored, dict):
        return  # a new run, or a checkpoint written before runs recorded their data
    if (stored.get("source") == "python") != python:
        if stored.get("source") == "python":
            raise UserError("the run was started on a Python Dataset; resume it from Python with the same one: "
                            "dartsnas.search/train(..., resume=RUN_DIR, train_data=...)")
        raise UserError(f"the run was started on its --dataset {stored.get('source')} data; resume it with that, "
                        f"not a Python Dataset")


def check_resumed_data(stored: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """A resumed run must see the classes it started with (they size the classifier and fix the labels)."""
    if not isinstance(stored, dict):
        return
    for key in ("num_classes", "classes", "in_channels"):
        if stored.get(key) != now[key]:
            raise UserError(f"the data's {key.replace('_', ' ')} changed since the run started ({stored.get(key)} "
                            f"then, {now[key]} now); resume with the data the run started with")
