"""Running (or resuming) a whole protocol in its directory: checks, data, stages, summary."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..rundir import RunDir, atomic_write
from .protocol_manifest import Manifest
from .protocol_plan import StageContext, plan, stage_splits
from .protocol_scheduler import note, schedule
from .protocol_settings import Protocol, load_protocol
from .protocol_summary import build_summary, write_summary


@dataclass
class ProtocolResult:
    run_dir: Path
    summary: dict[str, Any]


@contextlib.contextmanager
def _lock(proto_dir: Path) -> Iterator[None]:
    """One protocol process per directory: a second one would run the same stages twice. The same
    lock as every run directory's, released (and its file removed) when the protocol ends."""
    rd = RunDir(proto_dir)
    rd.lock()
    try:
        yield
    finally:
        rd.unlock()


def _prepare_training_file(protocol: Protocol, proto_dir: Path, manifest: Manifest) -> tuple[Path, int]:
    """``data/train.npz``: the CIFAR-10 training images alone, the only data searches and selection read."""
    path = (proto_dir / "data" / "train.npz").resolve()
    info = manifest.data.get("data")
    if path.is_file() and info:
        return path, int(info["train_images"])
    from ..data.images import load_image_data

    data = load_image_data("cifar10", protocol.options.data, download=protocol.options.download)
    x = data.train.x.permute(0, 2, 3, 1).contiguous().numpy()
    y = data.train.y.numpy()
    atomic_write(path, lambda f: np.savez(f, x=x, y=y))
    manifest.data["data"] = {"source": protocol.options.data, "train_file": "data/train.npz",
                             "train_images": len(y)}
    manifest.save()
    return path, len(y)


def run(protocol: Protocol, on_epoch_end: Callable[[str, int, dict[str, Any]], None] | None = None
        ) -> ProtocolResult:
    """Run (or resume) the whole protocol; returns its directory and summary.

    Args:
        protocol: from :func:`make_protocol` or :func:`load_protocol`.
        on_epoch_end: with ``jobs == 1``, called as ``on_epoch_end(stage_name, epoch, record)`` after
            each epoch of each stage (stages in separate processes cannot call back).
    """
    proto_dir = Path(protocol.options.save) if protocol.options.save else protocol.default_dir()
    protocol = dataclasses.replace(protocol, options=dataclasses.replace(protocol.options, save=str(proto_dir)))
    try:
        proto_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create protocol directory {proto_dir}: {exc.strerror}") from None
    with _lock(proto_dir):
        return _run(protocol, proto_dir, on_epoch_end)


def _run(protocol: Protocol, proto_dir: Path, on_epoch_end: Callable[[str, int, dict[str, Any]], None] | None
         ) -> ProtocolResult:
    rd = RunDir(proto_dir)
    command = f"protocol-{protocol.target.name}"
    manifest = Manifest.load_or_create(proto_dir / "manifest.json", command, protocol.comparable())
    if rd.config.is_file():
        stored = load_protocol(proto_dir, {}).comparable()
        if stored != protocol.comparable():
            changed = sorted(_differences(stored, protocol.comparable()))
            raise UserError(f"{proto_dir} holds a protocol with other settings ({', '.join(changed[:4])}); "
                            f"run it with its own settings (--resume {proto_dir}) or choose another --save")
        note(rd, "resuming the protocol in %s", proto_dir)
    else:
        rd.write_config(protocol.to_dict(), command)
        note(rd, "protocol %s in %s: %d searches, %d final runs", protocol.target.name, proto_dir,
             protocol.options.seeds, protocol.options.final_runs)
    manifest.save()

    train_file, n_train = (None, None)
    if protocol.target.name == "cnn":
        train_file, n_train = _prepare_training_file(protocol, proto_dir, manifest)
    ctx = StageContext(protocol, proto_dir, train_file, n_train)
    stages = plan(protocol)
    for stage in stages:
        entry = manifest.stages.setdefault(stage.name, {"kind": stage.kind, "seed": stage.seed, "status": "pending",
                                                        "attempts": 0, "seconds": 0.0})
        entry["splits"] = stage_splits(stage, ctx)
    manifest.save()
    schedule(stages, ctx, manifest, rd, on_epoch_end)

    summary = build_summary(protocol, proto_dir, manifest)
    write_summary(proto_dir, summary)
    selected = manifest.data["selection"]
    shutil.copyfile(proto_dir / selected["search"] / "genotype.json", proto_dir / "genotype.json")
    final = summary["final"]["test"]
    if final["n"] == 0:
        note(rd, "warning: no final run reported a test number; for cnn pass --test_data FILE.npz when the "
                 "test images do not lie next to --data")
    note(rd, "selected the cell of search seed %d (%s %.4f); test %s over %d runs: %s +- %s", selected["seed"],
         selected["metric"], selected["score"], protocol.target.test_metric, final["n"], final["mean"], final["std"])
    from .common import write_figures

    write_figures(proto_dir)
    return ProtocolResult(proto_dir, summary)


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            yield from _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            yield f"{prefix}{key}: {va!r} -> {vb!r}"
