"""The protocol's stages: which runs there are, what each waits for, and the engine config of each.

Only plans; running the stages is :mod:`.protocol_scheduler`'s job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .protocol_settings import Protocol


@dataclass(frozen=True)
class Stage:
    name: str  # also its directory under the protocol directory
    kind: str  # search / select / final
    seed: int
    index: int  # search seed's position (search, select) or run number (final)
    deps: tuple[str, ...]


def plan(protocol: Protocol) -> list[Stage]:
    """Every stage in the order it is launched; a select stage needs only its own search."""
    opts = protocol.options
    seeds = [opts.seed + i for i in range(opts.seeds)]
    stages = [Stage(f"search/seed-{s}", "search", s, i, ()) for i, s in enumerate(seeds)]
    stages += [Stage(f"select/seed-{s}", "select", opts.seed, i, (f"search/seed-{s}",)) for i, s in enumerate(seeds)]
    selects = tuple(f"select/seed-{s}" for s in seeds)
    stages += [Stage(f"final/run-{r}", "final", opts.seed + r, r, selects) for r in range(opts.final_runs)]
    return stages


def search_seed(stage: Stage, protocol: Protocol) -> int:
    return protocol.options.seed + stage.index


@dataclass
class StageContext:
    """What every stage config is built from, besides the stage itself."""

    protocol: Protocol
    proto_dir: Path
    train_file: Path | None  # cnn: the training images only, read by searches and selection runs
    train_images: int | None


def stage_config(stage: Stage, ctx: StageContext, selected: str | None, device: str, threads: int) -> Any:
    """The engine config of one stage: the stage kind's settings plus what the protocol fixes."""
    protocol, tgt = ctx.protocol, ctx.protocol.target
    cfg = protocol.stages[stage.kind]
    fixed: dict[str, Any] = {"save": str((ctx.proto_dir / stage.name).resolve()), "seed": stage.seed,
                             "device": device, "threads": threads}
    opts = protocol.options
    if tgt.name == "cnn":
        fixed["download"] = opts.download
        if stage.kind == "search":
            fixed.update(dataset="cifar10", data=str(ctx.train_file))
        elif stage.kind == "select":
            # Reading a file that holds no test images is what guarantees that selection cannot see them.
            fixed.update(data=str(ctx.train_file), test_data=None)
        else:
            fixed.update(data=opts.data, test_data=opts.test_data)
    else:
        if opts.data is not None:
            fixed["data"] = opts.data
        if stage.kind != "search":
            fixed.update(dataset="ptb", final_test=stage.kind == "final")
    if stage.kind == "select":
        fixed["arch"] = str((ctx.proto_dir / f"search/seed-{search_seed(stage, protocol)}").resolve())
    elif stage.kind == "final":
        assert selected is not None
        fixed["arch"] = str((ctx.proto_dir / selected).resolve())
    return dataclasses.replace(cfg, **fixed)


def stage_splits(stage: Stage, ctx: StageContext) -> dict[str, Any]:
    """Which images (tokens) a stage trains on, which it scores on, and whether it sees the test set."""
    cfg = ctx.protocol.stages[stage.kind]
    if ctx.protocol.target.name == "rnn":
        # The vocabulary spans all three files (the authors' rnn/data.py builds one dictionary over train, valid and test), but only final runs evaluate test.txt.
        data = ctx.protocol.options.data or "data/penn"
        if stage.kind == "search":
            return {"data": data, "weights": "train.txt", "alpha": "valid.txt", "test": False}
        return {"data": data, "train": "train.txt", "selection" if stage.kind == "select" else "model choice":
                "valid.txt", "test": stage.kind == "final"}
    n = ctx.train_images or 0
    if stage.kind == "search":
        n_w = int(np.floor(cfg.train_portion * n))
        return {"data": "data/train.npz", "weights": f"{n_w} training images", "alpha": f"{n - n_w} training images",
                "test": False}
    held = f"{cfg.valid_size} held-out training images" if cfg.valid_size else "none"
    if stage.kind == "select":
        return {"data": "data/train.npz", "train": f"{n - cfg.valid_size} training images", "selection": held,
                "test": False}
    return {"data": ctx.protocol.options.data or "CIFAR-10 folder", "train": f"{n - cfg.valid_size} training images",
            "held-out": held, "test": True}
