"""Run directories: every command writes its config, log, metrics and checkpoints in one place.

Layout (shared by search, train and every later command)::

    RUN_DIR/
      config.yaml            resolved config + package version (+ git SHA when run from a checkout)
      log.txt                everything printed to stdout
      metrics.jsonl          one JSON object per epoch
      steps.jsonl            with --log_steps: one JSON object per training step (step, epoch, loss, lr)
      genotype.json          the final (search) or trained (train) architecture
      genotypes/epoch_XXX.json   search only: the derived genotype after each epoch
      alphas/epoch_XXX.json      search only: softmaxed alphas after each epoch
      checkpoints/last.pt    resumable state, loads with torch.load(weights_only=True)

Every file is written atomically (temporary file + ``os.replace``), so an interrupted run never
leaves a half-written checkpoint or config behind; ``steps.jsonl`` alone is appended line by line, and
a resume cuts it back to the checkpoint's step (a line cut short by a kill included).
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        # mkstemp creates owner-only files; give the result the permissions of any new file.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "write" in str(exc).lower()):
            # A full disk or a lost permission: the previous version of the file is untouched.
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            raise UserError(f"cannot write {path}: {reason}; its previous version, if any, is intact") from None
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


LOCK_NAME = ".lock"


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def default_run_dir(command: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{command}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _count_of(line: str, key: str) -> int | None:
    """The ``key`` (epoch, step) of a JSON-lines record, or None for a damaged line (which a resume drops)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    value = record.get(key) if isinstance(record, dict) else None
    return value if isinstance(value, int) else None


def _truncate_lines(path: Path, key: str, done: int) -> None:
    """Keep the records of ``path`` whose ``key`` is at most ``done`` (those a checkpoint covers)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if (n := _count_of(line, key)) is not None and n <= done]
    write_text(path, "".join(line + "\n" for line in keep))


def console_filter(record: logging.LogRecord) -> bool:
    """Drop from the console what a command prints itself at the end (its result): logged with
    ``extra=FILE_ONLY``, such lines go to ``log.txt`` only, so the console shows them once."""
    return getattr(record, "console", True)


FILE_ONLY = {"console": False}


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
    def steps(self) -> Path:
        return self.path / "steps.jsonl"

    @property
    def genotype(self) -> Path:
        return self.path / "genotype.json"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_NAME

    # writers ----------------------------------------------------------------------------------
    def create(self, resume: bool = False, command: str | None = None) -> None:
        """Create (or reopen) the directory and take its lock; a new run only goes into a new or empty
        folder, or into one that holds an earlier start of the same command that never finished an
        epoch (it restarts there). Nothing else in the folder is touched."""
        if not resume and self.checkpoint.exists():
            raise UserError(
                f"{self.path} already holds a run; pass --resume {self.path} to continue it or choose another --save"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create run directory {self.path}: {exc.strerror}") from None
        self.lock()
        try:
            if not resume:
                self._check_new(command)
            self._remove_stale_temporaries()
        except BaseException:
            self.unlock()
            raise

    def _check_new(self, command: str | None) -> None:
        if self.checkpoint.exists():  # started by another process between the first check and the lock
            raise UserError(f"{self.path} already holds a run; pass --resume {self.path} to continue it or choose "
                            f"another --save")
        # A start killed before it wrote its settings leaves only its log (which a new start appends to).
        entries = [p for p in self.path.iterdir() if p.name not in (LOCK_NAME, "log.txt") and not _is_temporary(p)]
        if not entries:
            return
        stored = None
        if self.config.is_file():
            with contextlib.suppress(OSError, UnicodeDecodeError, yaml.YAMLError):
                data = yaml.safe_load(self.config.read_text(encoding="utf-8"))
                stored = data.get("command") if isinstance(data, dict) else None
        if command is None or stored != command:
            raise UserError(f"{self.path} is not empty and does not hold a {command or 'dartsnas'} run; choose a new "
                            f"or empty folder with --save")
        # An earlier start of this command that wrote no checkpoint: the run restarts here (the loop
        # drops that start's epoch records).

    def _remove_stale_temporaries(self) -> None:
        """Half-written files of a killed run (atomic writes never finished): nobody else writes here."""
        for tmp in [*self.path.glob(".*.tmp"), *self.path.glob("*/.*.tmp")]:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def lock(self) -> None:
        """Hold an exclusive lock on the directory for the life of the run (released by :meth:`unlock`,
        or by the system when the process dies)."""
        try:
            import fcntl
        except ImportError:  # not POSIX (Windows): no lock, the user is trusted
            return
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"{self.path} is in use by another dartsnas process (PID {holder}); wait for it to end "
                                f"or choose another --save") from None
            # The previous holder may have removed the file between our open and our lock: lock the file
            # that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is None:
            return
        with contextlib.suppress(OSError):
            self.lock_file.unlink()
        os.close(fd)
        self._lock_fd = None

    def write_config(self, config: dict[str, Any], command: str) -> None:
        meta = {"command": command, "dartsnas_version": __version__}
        sha = git_sha()
        if sha:
            meta["git_sha"] = sha
        write_text(self.config, yaml.safe_dump({**meta, "config": config}, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        if not self.config.is_file():
            raise UserError(f"{self.path} has no config.yaml; is it a dartsnas run directory?")
        try:
            data = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise UserError(f"{self.config} cannot be read ({str(exc).splitlines()[0]}); the run directory is "
                            f"damaged") from None
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise UserError(f"{self.config} does not hold a run's settings; the run directory is damaged")
        return data

    def append_metrics(self, record: dict[str, Any]) -> None:
        # Rewritten whole (atomically) rather than appended, so that a crash mid-write cannot leave
        # a truncated line; the file holds one small line per epoch.
        lines = self.metrics.read_text(encoding="utf-8").splitlines() if self.metrics.exists() else []
        lines.append(json.dumps(record))
        write_text(self.metrics, "\n".join(lines) + "\n")

    def truncate_metrics(self, epochs_done: int) -> None:
        """On resume, forget metrics of epochs after the checkpoint (they will be recomputed)."""
        _truncate_lines(self.metrics, "epoch", epochs_done)

    def truncate_steps(self, steps_done: int) -> None:
        """On resume, forget the step records after the checkpoint's step (those steps run again)."""
        _truncate_lines(self.steps, "step", steps_done)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The epoch records; a damaged line is skipped with a warning (the checkpoint is the source of truth)."""
        if not self.metrics.exists():
            return []
        out = []
        for n, line in enumerate(self.metrics.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                out.append(record)
            else:
                logger.warning("%s line %d is not an epoch record; skipped", self.metrics, n)
        return out

    @contextlib.contextmanager
    def logging(self, level: int = logging.INFO) -> Iterator[logging.Logger]:
        """Send the package's log records to stdout and ``log.txt`` for the duration of a run."""
        fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%m/%d %H:%M:%S")
        file_handler = logging.FileHandler(self.log, mode="a", encoding="utf-8")
        file_handler.setFormatter(fmt)
        stream_handler = logging.StreamHandler(sys.stdout)
        stream_handler.setFormatter(fmt)
        stream_handler.addFilter(console_filter)
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
