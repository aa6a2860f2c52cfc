"""The protocol's bookkeeping files: ``manifest.json`` (what is done) and ``summary.md``/``summary.json``.

Every number in the summary is read back from the stage run directories (``metrics.jsonl``,
``genotype.json``, ``test.json``), never from values held in memory, so the summary of a protocol
that was interrupted and resumed is the same as that of one that ran straight through.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..genotype import AnyGenotype
from ..genotype import from_dict as genotype_from_dict
from ..rundir import RunDir, read_json, write_json, write_text

MANIFEST_VERSION = 1


class Manifest:
    """``PROTOCOL_DIR/manifest.json``: one entry per stage with its status, attempts and wall time.

    Only the protocol's own process writes it (stage processes never do), so there is no
    concurrent writer; each write replaces the file atomically.
    """

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def load_or_create(cls, path: Path, kind: str, config: dict[str, Any]) -> Manifest:
        if path.is_file():
            data = read_json(path)
            if data.get("format_version") != MANIFEST_VERSION or data.get("kind") != kind:
                raise UserError(f"{path} is not a {kind} protocol manifest of this version; choose another --save")
            return cls(path, data)
        return cls(path, {"format_version": MANIFEST_VERSION, "kind": kind, "config": config, "stages": {},
                          "selection": None})

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def stage(self, name: str) -> dict[str, Any]:
        return self.stages[name]

    def is_done(self, name: str) -> bool:
        return name in self.stages and self.stages[name]["status"] == "done"

    def save(self) -> None:
        write_json(self.path, self.data)


# -- reading stage results ------------------------------------------------------------------------


def last_record(run_dir: Path, key: str) -> float | None:
    """``key`` of the last epoch record that has it (None when no epoch reported it)."""
    for record in reversed(RunDir(run_dir).read_metrics()):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def best_record(run_dir: Path, key: str, higher_is_better: bool) -> float | None:
    values = [float(r[key]) for r in RunDir(run_dir).read_metrics() if isinstance(r.get(key), (int, float))]
    if not values:
        return None
    return max(values) if higher_is_better else min(values)


def read_genotype(run_dir: Path) -> AnyGenotype:
    path = run_dir / "genotype.json"
    if not path.is_file():
        raise UserError(f"{run_dir} has no genotype.json; the search stage did not finish")
    return genotype_from_dict(read_json(path))


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1), the spread DARTS-style tables report."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


# -- summary ------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pm(stats: dict[str, Any], digits: int = 2) -> str:
    if stats["mean"] is None:
        return "n/a"
    spread = "n/a (one run)" if stats["std"] is None else f"{stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {spread} (n = {stats['n']})"


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _split_text(key: str, value: Any) -> str:
    if key == "test":
        return "evaluated once, after the last epoch" if value else "not evaluated"
    return str(value)


def render_markdown(summary: dict[str, Any]) -> str:
    """``summary.md``: the tables a paper would print, with every seed and every number listed."""
    sel = summary["selection"]
    final = summary["final"]
    unit, lower = summary["test_metric"], summary["test_lower_is_better"]
    lines = [
        f"# DARTS protocol ({summary['target']})", "",
        (f"{len(summary['candidates'])} searches, each cell trained briefly and scored on {sel['split']} "
         f"({sel['metric']}, {'higher' if sel['higher_is_better'] else 'lower'} is better); the best cell was then "
         f"trained {len(final['runs'])} times from scratch, each run evaluated once on the test set."), "",
        "## Searches and selection", "",
        f"| search seed | genotype | search {summary['search_metric']} | selection {sel['metric']} | selected |",
        "|---|---|---|---|---|",
    ]
    for c in summary["candidates"]:
        lines.append(f"| {c['seed']} | `{c['genotype_text']}` | {_fmt(c['search_score'])} | "
                     f"{_fmt(c['selection_score'])} | {'**yes**' if c['selected'] else ''} |")
    lines += ["", f"Selected: the cell of search seed {sel['seed']} ({sel['metric']} {_fmt(sel['score'])}).", "",
              "## Final training of the selected cell", "",
              f"| run | seed | test {unit} ({'lower' if lower else 'higher'} is better) |", "|---|---|---|"]
    for r in final["runs"]:
        lines.append(f"| {r['run']} | {r['seed']} | {_fmt(r['test'])} |")
    lines += ["", f"**Test {unit}: {_pm(final['test'])}** (mean ± sample standard deviation over the runs)."]
    if final.get("test_accuracy"):
        lines.append(f"Test accuracy: {_pm(final['test_accuracy'])}.")
    lines += ["", "## Data splits", ""]
    for stage, splits in summary["splits"].items():
        lines.append(f"- {stage}: " + "; ".join(f"{k}: {_split_text(k, v)}" for k, v in splits.items()))
    # Wall times come last: they are the only part that differs between two runs of the same protocol.
    lines += ["", "## Compute", "", "| stage | wall time | attempts |", "|---|---|---|"]
    for name, info in summary["compute"]["stages"].items():
        lines.append(f"| {name} | {_duration(info['seconds'])} | {info['attempts']} |")
    for kind, seconds in summary["compute"]["per_kind"].items():
        lines.append(f"| all {kind} stages | {_duration(seconds)} | |")
    lines.append(f"| total | {_duration(summary['compute']['total'])} | |")
    return "\n".join(lines) + "\n"


def write_summary(proto_dir: Path, summary: dict[str, Any]) -> None:
    write_json(proto_dir / "summary.json", summary)
    write_text(proto_dir / "summary.md", render_markdown(summary))
