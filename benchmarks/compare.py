"""Run one of the benchmarks on an earlier release of dartsnas and on this tree, and print ratios.

The earlier release is any git revision (default: the one named in ``benchmarks/BASELINE``). It is
extracted with ``git archive`` into a temporary folder and its own copy of the benchmark script
runs against its own ``src/``; this tree's script runs against this tree. The two alternate for
``--rounds`` rounds (so that a slow minute on a shared machine hits both), and the table reports
the median over rounds of each side's median step time, the speed-up (baseline / current) and
both peak memories.

    python benchmarks/compare.py rnn_step --what search --orders 1 --steps 2
    python benchmarks/compare.py search_step --batches 64 --orders 1,2 --steps 2 --rounds 2
    python benchmarks/compare.py train_step --steps 2 --eval_batches 2 --formats auto
    python benchmarks/compare.py --baseline v0.1.0 rnn_step --what train

Everything after the benchmark's name is passed to it unchanged. Run by hand; figures go to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCHES = ("search_step", "rnn_step", "train_step")
# Fields that describe a measurement rather than name the configuration.
MEASURED = {"median_s", "train_step_s", "peak_gib", "search_gib", "tokens_per_s", "train_images_per_s",
            "eval_images_per_s", "steps", "warmup_s", "gflop", "matmul_gflops", "floor_s"}
TIME_FIELDS = ("median_s", "train_step_s")  # seconds per step, whichever the benchmark reports


def _default_baseline() -> str:
    path = HERE / "BASELINE"
    return path.read_text().split()[0] if path.exists() else "HEAD~1"


def _extract(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=False)
    if archive.returncode:
        sys.exit(f"error: cannot read revision {rev!r} from git ({archive.stderr.decode().strip()}); "
                 f"pass an existing commit or tag with --baseline")
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _run(root: Path, bench: str, args: list[str], out: Path) -> list[dict]:
    script = root / "benchmarks" / f"{bench}.py"
    if not script.exists():
        sys.exit(f"error: {script.relative_to(root)} does not exist in that revision; pick a later --baseline")
    env = dict(os.environ, PYTHONPATH=str(root / "src"))
    done = subprocess.run([sys.executable, str(script), *args, "--json", str(out)], env=env, check=False, cwd=root)
    if done.returncode:
        raise SystemExit(f"compare: {script.name} failed on {root} (exit status {done.returncode}; its error is above)")
    return json.loads(out.read_text())["rows"]


def _settings(row: dict) -> dict:
    # A switch that is off (False / None) matches a revision whose benchmark did not have it yet.
    return {k: v for k, v in row.items() if k not in MEASURED and v is not False and v is not None}


def _key(row: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in _settings(row).items()))


def _label(row: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in _settings(row).items() if k not in ("device", "threads"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=None, help="git revision to compare with (default: benchmarks/BASELINE)")
    p.add_argument("--rounds", type=int, default=1, help="alternate baseline and current this many times")
    p.add_argument("bench", choices=BENCHES)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    a = p.parse_args()
    rev = a.baseline or _default_baseline()
    runs: dict[str, dict[tuple, list[dict]]] = {"baseline": {}, "current": {}}
    labels: dict[tuple, str] = {}
    with tempfile.TemporaryDirectory(prefix="dartsnas-baseline-") as tmp:
        base_root = _extract(rev, Path(tmp) / "tree")
        for r in range(a.rounds):
            for side, root in (("baseline", base_root), ("current", REPO)):
                print(f"-- round {r + 1}/{a.rounds}: {side} ({rev if side == 'baseline' else 'this tree'})",
                      flush=True)
                for row in _run(root, a.bench, a.args, Path(tmp) / f"{side}-{r}.json"):
                    runs[side].setdefault(_key(row), []).append(row)
                    labels[_key(row)] = _label(row)
    print(f"\n{a.bench}: baseline {rev} vs this tree, median of {a.rounds} round(s)")
    print("| configuration | baseline s/step | current s/step | speed-up | baseline peak | current peak |")
    print("|---|---|---|---|---|---|")
    for key, label in labels.items():
        base, cur = runs["baseline"].get(key), runs["current"].get(key)
        if not base or not cur:
            print(f"| {label} | {'-' if not base else ''} | {'-' if not cur else ''} | not in both | | |")
            continue
        field = next((f for f in TIME_FIELDS if f in base[0] and f in cur[0]), None)
        mb = max(r.get("peak_gib", 0.0) for r in base)
        mc = max(r.get("peak_gib", 0.0) for r in cur)
        if field is None:
            print(f"| {label} | - | - | - | {mb:.2f} GiB | {mc:.2f} GiB |")
            continue
        tb = statistics.median(r[field] for r in base)
        tc = statistics.median(r[field] for r in cur)
        print(f"| {label} | {tb:.3f} | {tc:.3f} | {tb / tc:.2f}x | {mb:.2f} GiB | {mc:.2f} GiB |")

if __name__ == "__main__":
    main()
