"""Run directories: every command writes its config, log, metrics and checkpoints in one place.

Layout (shared by search, train and every later command)::

    RUN_DIR/
      config.yaml            resolved config + package version (+ git SHA when run from a checkout)
      log.txt                everything printed to stdout
      metrics.jsonl          one JSON object per epoch
      genotype.json          the final (search) or trained (train) architecture
      genotypes/epoch_XXX.json   search only: the derived genotype after each epoch
      alphas/epoch_XXX.json      search only: softmaxed alphas after each epoch
      checkpoints/last.pt    resumable state, loads with torch.load(weights_only=True)

Every file is written atomically (temporary file + ``os.replace``), so an interrupted run never
leaves a half-written checkpoint or config behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .errors import UserError

logger = logging.getLogger("dartsnas")


def atomic_write(path: str | os.PathLike[str], write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file through ``write(fileobj)`` so that readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates owner-only files; give the result the permissions of any new file.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def git_sha() -> str | None:
    """The commit of the source tree the package runs from, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def default_run_dir(command: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{command}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


class RunDir:
    """A run directory: paths, atomic writers and the stdout+file log of one run."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    # paths ------------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def log(self) -> Path:
        return self.path / "log.txt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def genotype(self) -> Path:
        return self.path / "genotype.json"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    # writers ----------------------------------------------------------------------------------
    def create(self, resume: bool = False) -> None:
        if not resume and self.checkpoint.exists():
            raise UserError(
                f"{self.path} already holds a run; pass --resume {self.path} to continue it or choose another --save"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create run directory {self.path}: {exc.strerror}") from None

    def write_config(self, config: dict[str, Any], command: str) -> None:
        meta = {"command": command, "dartsnas_version": __version__}
        sha = git_sha()
        if sha:
            meta["git_sha"] = sha
        write_text(self.config, yaml.safe_dump({**meta, "config": config}, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        if not self.config.is_file():
            raise UserError(f"{self.path} has no config.yaml; is it a dartsnas run directory?")
        with open(self.config, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        return data

    def append_metrics(self, record: dict[str, Any]) -> None:
        # Rewritten whole (atomically) rather than appended, so that a crash mid-write cannot leave
        # a truncated line; the file holds one small line per epoch.
        lines = self.metrics.read_text(encoding="utf-8").splitlines() if self.metrics.exists() else []
        lines.append(json.dumps(record))
        write_text(self.metrics, "\n".join(lines) + "\n")

    def truncate_metrics(self, epochs_done: int) -> None:
        """On resume, forget metrics of epochs after the checkpoint (they will be recomputed)."""
        if not self.metrics.exists():
            return
        keep = [
            line
            for line in self.metrics.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= epochs_done
        ]
        write_text(self.metrics, "".join(line + "\n" for line in keep))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text(encoding="utf-8").splitlines() if line.strip()]

    @contextlib.contextmanager
    def logging(self, level: int = logging.INFO) -> Iterator[logging.Logger]:
        """Send the package's log records to stdout and ``log.txt`` for the duration of a run."""
        fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%m/%d %H:%M:%S")
        file_handler = logging.FileHandler(self.log, mode="a", encoding="utf-8")
        file_handler.setFormatter(fmt)
        stream_handler = logging.StreamHandler(sys.stdout)
        stream_handler.setFormatter(fmt)
        old_level = logger.level
        logger.setLevel(level)
        logger.addHandler(file_handler)
        logger.addHandler(stream_handler)
        old_propagate = logger.propagate
        logger.propagate = False
        try:
            yield logger
        finally:
            logger.removeHandler(file_handler)
            logger.removeHandler(stream_handler)
            file_handler.close()
            logger.setLevel(old_level)
            logger.propagate = old_propagate
