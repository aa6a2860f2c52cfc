"""Pieces every training loop shares: progress bars, TensorBoard, figures at the end of a run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import UserError
from ..rundir import atomic_write
from ..utils import is_tty

# Version of the resumable checkpoint dicts the engines write (``checkpoints/last.pt``).
FORMAT_VERSION = 1

logger = logging.getLogger("dartsnas")


def progress(total: int, desc: str) -> tqdm:
    """A per-epoch bar on interactive terminals; silent in logs, CI and notebooks' captured output."""
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not is_tty())


class TensorBoard:
    """Scalars of each epoch record as TensorBoard events (optional dependency)."""

    def __init__(self, path: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(str(path))

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
    except Exception as exc:  # a figure must never cost the user a finished run
        logger.warning("figures skipped: %s", exc)
        return []
    if files:
        logger.info("figures: %s", ", ".join(str(f) for f in files))
    return files


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint dict atomically: an interrupted save leaves the previous one intact."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no pickled code runs).

    With ``kind``, insist on a resumable checkpoint of that command and of this format version.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, foreign pickle, ...
        raise UserError(f"cannot load checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if kind is not None and (not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION
                             or state.get("kind") != kind):
        raise UserError(f"{path} is not a {kind} checkpoint of this version")
    return state
