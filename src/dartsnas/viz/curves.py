"""Learning curves of one or several runs: every run thin, their mean bold, the spread shaded."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..rundir import RunDir

# train_loss, valid_acc, test_ppl, ...: split into the data split and the quantity.
_METRIC = re.compile(r"^(train|valid|val|test)_(\w+)$")
_SPLIT_ORDER = ("train", "valid", "val", "test")
_SPLIT_STYLE = {"train": ("tab:blue", "-"), "valid": ("tab:orange", "-"), "val": ("tab:orange", "-"),
                "test": ("tab:green", "--")}
# The quantities drawn by default, in this panel order; others (throughput, ...) only when asked for.
_QUANTITY_TITLES = {"loss": "loss", "acc": "accuracy (%)", "acc_top5": "top-5 accuracy (%)",
                    "ppl": "perplexity"}
SPREADS = ("std", "range")

Series = dict[int, float]


@dataclass
class Aggregate:
    """Per-epoch statistics over the runs that reached that epoch."""

    epochs: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    count: list[int]


def read_run_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise UserError(f"{rd.path} is not a directory; pass run directories")
    if not rd.metrics.is_file():
        raise UserError(f"{rd.path} has no metrics.jsonl; is it a dartsnas run directory?")
    try:
        return rd.read_metrics()
    except json.JSONDecodeError as exc:
        raise UserError(f"{rd.metrics} is not one JSON object per line ({exc.msg} at line {exc.lineno})") from None


def series_of(records: Sequence[dict[str, Any]], key: str) -> Series:
    """``{epoch: value}`` of a metric; records without an epoch and non-finite values are left out."""
    out: Series = {}
    for record in records:
        epoch, value = record.get("epoch"), record.get(key)
        if isinstance(epoch, int) and _is_number(value) and math.isfinite(value):
            out[epoch] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_keys(records: Sequence[dict[str, Any]], everything: bool = False) -> list[str]:
    """The per-epoch metrics of a run that can be drawn (``train_loss``, ``valid_acc``, ...).

    Only losses, accuracies and perplexities unless ``everything`` (then e.g. ``train_images_per_s`` too).
    """
    keys = []
    for record in records:
        if not isinstance(record.get("epoch"), int):
            continue
        for key, value in record.items():
            match = _METRIC.match(key)
            if match and _is_number(value) and key not in keys and (everything or match.group(2) in _QUANTITY_TITLES):
                keys.append(key)
    return keys


def aggregate(runs: Sequence[Series], spread: str = "std") -> Aggregate:
    """Mean and spread per epoch over ``runs`` (runs of different length are averaged where present).

    ``spread='std'``: mean +- the sample standard deviation (0 for a single run); ``'range'``: min..max.
    """
    if spread not in SPREADS:
        raise UserError(f"unknown spread {spread!r}; choose from {', '.join(SPREADS)}")
    epochs = sorted({e for run in runs for e in run})
    agg = Aggregate(epochs, [], [], [], [])
    for epoch in epochs:
        values = [run[epoch] for run in runs if epoch in run]
        n = len(values)
        mean = sum(values) / n
        if spread == "range":
            low, high = min(values), max(values)
        else:
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
            low, high = mean - std, mean + std
        agg.mean.append(mean)
        agg.low.append(low)
        agg.high.append(high)
        agg.count.append(n)
    return agg


def _run_labels(run_dirs: Sequence[Path]) -> list[str]:
    names = [p.resolve().name for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{p.resolve().parent.name}/{p.resolve().name}" for p in run_dirs]


def plot_curves(run_dirs: Sequence[str | Path], out: str | Path, *, metrics: Sequence[str] | None = None,
                spread: str = "std", title: str | None = None) -> Path:
    """Draw learning curves of one or more runs into ``out`` (format from its suffix).

    One panel per quantity (loss, accuracy, perplexity, ...), one colour per split. With several
    runs, each is a thin line and the mean a bold one, shaded by the spread (``std`` or ``range``).

    Args:
        run_dirs: run directories with a ``metrics.jsonl``.
        out: the image file to write.
        metrics: only these keys (e.g. ``valid_acc``); default: every per-epoch metric.
        spread: 'std' or 'range'.
        title: figure title (default: the run names).
    """
    if not run_dirs:
        raise UserError("pass at least one run directory")
    if spread not in SPREADS:
        raise UserError(f"unknown spread {spread!r}; choose from {', '.join(SPREADS)}")
    paths = [Path(p) for p in run_dirs]
    runs = [read_run_metrics(p) for p in paths]
    keys: list[str] = []
    for records in runs:
        keys += [k for k in metric_keys(records, everything=bool(metrics)) if k not in keys]
    if metrics:
        unknown = [m for m in metrics if m not in keys]
        if unknown:
            raise UserError(f"no run has per-epoch {', '.join(unknown)}; available: {', '.join(keys) or 'none'}")
        keys = list(metrics)
    if not keys:
        raise UserError("the runs have no per-epoch metrics to draw (metrics.jsonl records need an epoch and "
                        "train_/valid_/test_ values)")

    panels: dict[str, list[str]] = {}
    for key in keys:
        split, quantity = _METRIC.match(key).groups()  # type: ignore[union-attr]
        panels.setdefault(quantity, []).append(key)
    known = list(_QUANTITY_TITLES)
    order = sorted(panels, key=lambda q: (known.index(q) if q in known else len(known), q))

    from matplotlib.ticker import MaxNLocator

    from .plotting import new_figure, save_figure

    fig = new_figure(figsize=(4.6 * len(order), 3.6))
    axes = fig.subplots(1, len(order), squeeze=False)[0]
    many = len(paths) > 1
    for ax, quantity in zip(axes, order):
        for key in sorted(panels[quantity], key=lambda k: _SPLIT_ORDER.index(_METRIC.match(k).group(1))):
            split = _METRIC.match(key).group(1)  # type: ignore[union-attr]
            color, style = _SPLIT_STYLE[split]
            per_run = [series_of(records, key) for records in runs]
            per_run = [s for s in per_run if s]
            if not per_run:
                continue
            agg = aggregate(per_run, spread)
            marker = "o" if len(agg.epochs) <= 12 else None
            if many:
                for s in per_run:
                    xs = sorted(s)
                    ax.plot(xs, [s[e] for e in xs], color=color, ls=style, lw=0.8, alpha=0.35)
                ax.fill_between(agg.epochs, agg.low, agg.high, color=color, alpha=0.18, lw=0)
                label = f"{split} (mean of {len(per_run)})"
            else:
                label = split
            ax.plot(agg.epochs, agg.mean, color=color, ls=style, lw=2.0, marker=marker, ms=3.5, label=label)
        ax.set_title(_QUANTITY_TITLES.get(quantity, quantity), fontsize=11)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if quantity == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title is None:
        names = _run_labels(paths)
        title = names[0] if len(names) == 1 else f"{len(names)} runs: " + ", ".join(names)
        if len(title) > 110:
            title = title[:107] + "..."
    if many:
        title += "  (band: " + ("mean ± std" if spread == "std" else "min to max") + ")"
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, out)
