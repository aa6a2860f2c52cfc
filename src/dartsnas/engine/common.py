"""Pieces every training loop shares: progress bars, TensorBoard, figures at the end of a run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import UserError
from ..utils import is_tty

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
