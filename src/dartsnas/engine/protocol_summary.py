"""The protocol's results: the selection, and ``summary.md``/``summary.json``.

Every number in the summary is read back from the stage run directories (``metrics.jsonl``,
``genotype.json``, ``test.json``), never from values held in memory, so the summary of a protocol
that was interrupted and resumed is the same as that of one that ran straight through.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..genotype import AnyGenotype
from ..genotype import from_dict as genotype_from_dict
from ..rundir import RunDir, read_json, write_json, write_text
from .protocol_manifest import Manifest
from .protocol_plan import plan, search_seed
from .protocol_settings import STAGES, Protocol, Target

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


# -- the selection and the final numbers ---------------------------------------------------------


def selection_score(run_dir: Path, target: Target) -> float:
    if target.select_reduce == "last":
        score = last_record(run_dir, target.select_metric)
    else:
        score = best_record(run_dir, target.select_metric, target.select_higher_is_better)
    if score is None:
        raise UserError(f"{run_dir} reports no {target.select_metric} (the held-out score); the selection training "
                        f"needs a held-out split (select.valid_size > 0)")
    return score


def select_best(protocol: Protocol, proto_dir: Path) -> dict[str, Any]:
    """Score every candidate from its selection run directory and pick the best (first on ties)."""
    tgt = protocol.target
    best: dict[str, Any] | None = None
    for stage in plan(protocol):
        if stage.kind != "select":
            continue
        score = selection_score(proto_dir / stage.name, tgt)
        better = best is None or (score > best["score"] if tgt.select_higher_is_better else score < best["score"])
        if better:
            best = {"stage": stage.name, "search": f"search/seed-{search_seed(stage, protocol)}",
                    "seed": search_seed(stage, protocol), "metric": tgt.select_metric, "score": score}
    assert best is not None
    return best


def final_test_numbers(run_dir: Path, target: Target) -> tuple[float | None, float | None]:
    """(test number reported in the summary, test accuracy or None) of a final run."""
    if target.name == "cnn":
        acc = last_record(run_dir, "test_acc")
        return (None if acc is None else 100.0 - acc), acc
    test = run_dir / "test.json"
    if not test.is_file():
        return None, None
    value = json.loads(test.read_text(encoding="utf-8")).get("test_ppl")
    return (float(value) if value is not None else None), None


# -- summary ------------------------------------------------------------------------------------


def build_summary(protocol: Protocol, proto_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """Everything ``summary.md`` shows, read from the stage run directories."""
    tgt = protocol.target
    selection = select_best(protocol, proto_dir)
    stages = plan(protocol)
    candidates = []
    for stage in stages:
        if stage.kind != "search":
            continue
        genotype = read_genotype(proto_dir / stage.name)
        select_dir = f"select/seed-{stage.seed}"
        candidates.append({
            "seed": stage.seed, "search_dir": stage.name, "select_dir": select_dir,
            "genotype": genotype.to_dict(), "genotype_text": str(genotype),
            "search_score": last_record(proto_dir / stage.name, tgt.search_metric),
            "selection_score": selection_score(proto_dir / select_dir, tgt),
            "selected": stage.name == selection["search"],
        })
    runs, tests, accs = [], [], []
    for stage in stages:
        if stage.kind != "final":
            continue
        test, acc = final_test_numbers(proto_dir / stage.name, tgt)
        runs.append({"run": stage.index, "seed": stage.seed, "dir": stage.name, "test": test, "test_accuracy": acc})
        tests.append(test)
        accs.append(acc)
    final: dict[str, Any] = {"runs": runs, "test": mean_std(tests)}
    if tgt.name == "cnn":
        final["test_accuracy"] = mean_std(accs)
    compute_stages = {s.name: {"seconds": manifest.stage(s.name)["seconds"],
                               "attempts": manifest.stage(s.name)["attempts"]} for s in stages}
    per_kind = {kind: sum(v["seconds"] for k, v in compute_stages.items() if k.startswith(kind + "/"))
                for kind in STAGES}
    return {
        "target": tgt.name, "search_metric": tgt.search_metric, "test_metric": tgt.test_metric,
        "test_lower_is_better": True,
        "candidates": candidates,
        "selection": {**selection, "split": tgt.select_split, "higher_is_better": tgt.select_higher_is_better,
                      "reduce": tgt.select_reduce},
        "final": final,
        "splits": {s.name: manifest.stage(s.name)["splits"] for s in stages},
        # Kept last and apart: the only entries that differ between two runs of the same protocol.
        "compute": {"stages": compute_stages, "per_kind": per_kind, "total": sum(per_kind.values())},
    }


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
