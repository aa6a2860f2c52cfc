"""Running a protocol's stages in order: each as soon as its inputs are done, at most ``--jobs`` at once.

The scheduler is the only writer of ``manifest.json`` while stages run, and picks the selected cell
as soon as every candidate is scored, so that final runs can start.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from collections.abc import Callable
from typing import Any

from ..config import to_dict
from ..rundir import RunDir
from ..utils import default_threads
from .protocol_executors import InProcessExecutor, ProcessExecutor, prepare_stage_dir
from .protocol_manifest import Manifest
from .protocol_plan import Stage, StageContext, stage_config
from .protocol_settings import Protocol
from .protocol_summary import select_best

logger = logging.getLogger("dartsnas")


def note(rd: RunDir, message: str, *args: Any) -> None:
    # The protocol's log lines go to its own log.txt; handlers are attached only around each line
    # because in-process stages attach their own handlers to the same logger while they run.
    with rd.logging():
        logger.info(message, *args)


def _devices(protocol: Protocol) -> tuple[list[str], int]:
    """One device name per job slot, and the CPU threads of each stage process."""
    opts = protocol.options
    from ..utils import resolve_device

    device = resolve_device(opts.device)
    threads = opts.threads or max(1, default_threads() // opts.jobs)
    if device.type == "cuda" and device.index is None:
        import torch

        count = max(1, torch.cuda.device_count())
        return [f"cuda:{i % count}" for i in range(opts.jobs)], threads
    return [opts.device] * opts.jobs, threads


def schedule(stages: list[Stage], ctx: StageContext, manifest: Manifest, rd: RunDir,
             on_epoch_end: Callable[[str, int, dict[str, Any]], None] | None) -> None:
    """Launch every stage whose inputs are done, at most ``jobs`` at a time, until all are done."""
    protocol, proto_dir = ctx.protocol, ctx.proto_dir
    tgt = protocol.target
    devices, threads = _devices(protocol)
    jobs = protocol.options.jobs
    executor = (InProcessExecutor(on_epoch_end) if jobs == 1
                else ProcessExecutor(jobs, [tgt.search_module, tgt.train_module]))
    pending = [s for s in stages if not manifest.is_done(s.name)]
    running: dict[cf.Future, tuple[Stage, int, float]] = {}
    free = list(range(jobs))
    failure: BaseException | None = None
    try:
        while pending or running:
            if manifest.data.get("selection") is None and all(
                    manifest.is_done(s.name) for s in stages if s.kind == "select"):
                manifest.data["selection"] = select_best(protocol, proto_dir)
                manifest.save()
                sel = manifest.data["selection"]
                note(rd, "selection: the cell of %s scores best (%s %.4f)", sel["search"], sel["metric"],
                     sel["score"])
            if failure is None:
                for stage in list(pending):
                    if not free:
                        break
                    if not all(manifest.is_done(d) for d in stage.deps):
                        continue
                    selected = manifest.data.get("selection") or {}
                    slot = free.pop(0)
                    cfg = stage_config(stage, ctx, selected.get("search"), devices[slot], threads)
                    stage_dir = proto_dir / stage.name
                    resume = prepare_stage_dir(stage_dir)
                    entry = manifest.stage(stage.name)
                    entry.update(status="running", attempts=entry["attempts"] + 1, dir=stage.name)
                    manifest.save()
                    note(rd, "%s %s (attempt %d)", "resuming" if resume else "starting", stage.name,
                         entry["attempts"])
                    module, cls_name = tgt.engine(stage.kind)
                    pending.remove(stage)
                    started = time.perf_counter()
                    future = executor.submit(stage, module, cls_name, to_dict(cfg), resume)
                    running[future] = (stage, slot, started)
            if not running:
                if pending and failure is None:
                    raise RuntimeError(f"no stage can start: {[s.name for s in pending]}")
                break
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                stage, slot, started = running.pop(future)
                free.append(slot)
                entry = manifest.stage(stage.name)
                entry["seconds"] += time.perf_counter() - started
                error = future.exception()
                if error is None:
                    entry["status"] = "done"
                    note(rd, "%s done (%.1f s)", stage.name, entry["seconds"])
                else:
                    entry["status"] = "failed"
                    entry["error"] = str(error).splitlines()[0] if str(error) else type(error).__name__
                    if failure is None:
                        failure = error
                        if running:
                            note(rd, "%s failed; waiting for %d running stage(s) to finish", stage.name,
                                 len(running))
                manifest.save()
    finally:
        executor.shutdown()
    if failure is not None:
        raise failure
