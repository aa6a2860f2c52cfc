"""How one protocol stage runs: in this process (``--jobs 1``) or in a process of its own (``--jobs N``).

Stage processes import the engine by module and class name, and :func:`run_stage` is pickled by
its qualified name, so both must stay importable under these names.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any

from .protocol_plan import Stage


def _watch_parent(parent: int) -> None:
    # A stage process whose protocol process was killed must not keep writing its run directory
    # while the user starts the protocol again. (Its parent is the protocol process, or the fork
    # server, which exits with the protocol process.)
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def prepare_stage_dir(stage_dir: Path) -> bool:
    """Whether a stage resumes: only from an epoch checkpoint. A stage directory without one was
    killed before its first epoch ended and holds nothing that can be resumed, so it is removed."""
    if (stage_dir / "checkpoints" / "last.pt").is_file():
        return True
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    return False


def run_stage(module: str, cls_name: str, config: dict[str, Any], resume: bool, in_process: bool = True,
              on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> None:
    """Run (or resume) one stage with its own engine; also the entry point of stage processes."""
    if not in_process:
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    engine = import_module(module)
    cfg = getattr(engine, cls_name)(**config)
    # The engines use the given config when resuming if its run directory is the one resumed; that
    # lets runtime settings (threads, device) follow this invocation.
    engine.run(cfg, resume=cfg.save if resume else None, on_epoch_end=on_epoch_end)


class InProcessExecutor:
    """``--jobs 1``: stages run one after the other in this process (no start-up cost per stage)."""

    def __init__(self, on_epoch_end: Callable[[str, int, dict[str, Any]], None] | None):
        self.on_epoch_end = on_epoch_end

    def submit(self, stage: Stage, *args: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        hook = None
        if self.on_epoch_end is not None:
            hook = functools.partial(self.on_epoch_end, stage.name)
        try:
            run_stage(*args, in_process=True, on_epoch_end=hook)
            future.set_result(None)
        except Exception as exc:  # noqa: BLE001 - handed to the scheduler like a failed stage process
            future.set_exception(exc)
        return future

    def shutdown(self) -> None:
        pass


class ProcessExecutor:
    """``--jobs N``: one fresh process per stage, at most N at a time."""

    def __init__(self, jobs: int, modules: list[str]):
        # Never plain fork: the protocol process may hold torch thread pools or CUDA state. A fork
        # server that has imported the engines (but run nothing) starts each stage in well under a
        # second, where a fresh interpreter spends seconds importing torch. This module is always
        # preloaded too: stage processes unpickle run_stage from it.
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__, *modules])
        else:
            context = multiprocessing.get_context("spawn")
        self.pool = cf.ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1)

    def submit(self, stage: Stage, *args: Any) -> cf.Future:
        return self.pool.submit(run_stage, *args, in_process=False)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
