"""What each robust-search method costs per search step, relative to plain first-order DARTS.

Every method runs as a real ``dartsnas search cnn`` (the same epoch loop users run, so SDARTS's noise
and attack, DrNAS's sampling, beta-DARTS's penalty and the DARTS- skip all take part) on the real
CIFAR-10 sample, for two epochs of ``--steps`` steps each; the first epoch warms up, the second is
timed (its time, divided by its steps, includes one evaluation batch and the cell's derivation).
The methods run in turn in every round, the order rotating from round to round, each in its own
process; the figure to quote is the median over rounds of the per-round ratio method / plain, since
the machine's speed drifts within minutes (a ratio of two runs taken apart says little).

    python benchmarks/variant_cost.py                          # 3 rounds, C=8, 5 cells, batch 64
    python benchmarks/variant_cost.py --size paper --rounds 3  # the paper's network (C=16, 8 cells)
    python benchmarks/variant_cost.py --only plain,pc-darts --json cost.json

Run by hand; figures go to benchmarks/RESULTS.md and the cost column of docs/variants.md.
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
sys.path.insert(0, str(HERE))
from side_by_side import cpu_description  # the benchmarks share one CPU description

DATA = Path(os.environ.get("DARTSNAS_DATA", HERE.parent.parent / "shared" / "data"))
SAMPLE = DATA / "cifar10" / "cifar10_train_first4000_exact.npz"

# name -> options of `dartsnas search cnn`, each at the setting docs/variants.md quotes.
METHODS: dict[str, list[str]] = {
    "plain": [],
    "second-order-fd": ["--unrolled", "--hvp", "fd"],
    "second-order-exact": ["--unrolled", "--hvp", "exact"],
    "pc-darts": ["--partial_channels", "4", "--edge_normalization"],
    "darts-minus": ["--aux_skip", "1.0"],
    "beta-darts": ["--beta_decay", "25"],
    "sdarts-rs": ["--alpha_noise", "0.3"],
    "sdarts-adv": ["--alpha_adversarial", "0.3"],
    "drnas": ["--dirichlet"],
}
SIZES = {"small": ["--init_channels", "8", "--layers", "5"], "paper": ["--init_channels", "16", "--layers", "8"]}


def step_seconds(method: str, args: argparse.Namespace) -> float:
    """Seconds per step of the timed (second) epoch of one search, in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "dartsnas", "search", "cnn", "--dataset", "npz", "--data", str(args.data),
               "--epochs", "2", "--limit_train_batches", str(args.steps), "--eval_batches", "1",
               "--batch_size", str(args.batch), "--threads", str(args.threads), "--no-plots", "--save", str(run),
               *SIZES[args.size], *METHODS[method]]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, timeout=args.timeout)
        if done.returncode:
            raise SystemExit(f"{method}: the search failed:\n{(done.stderr or done.stdout)[-2000:]}")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        timed = next(r for r in records if r.get("epoch") == 2)
        return float(timed["time"]) / args.steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds, every method once per round (default: 3)")
    p.add_argument("--steps", type=int, default=4, help="steps per epoch; the second epoch is timed (default: 4)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", choices=sorted(SIZES), default="small",
                   help="small: C=8, 5 cells; paper: C=16, 8 cells (both 32x32 images)")
    p.add_argument("--only", help=f"comma-separated methods (always with plain): {','.join(METHODS)}")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--data", default=str(SAMPLE), help="an .npz of images (default: the CIFAR-10 sample)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed to each search")
    p.add_argument("--json", help="also write the rounds and the summary to this file")
    args = p.parse_args(argv)
    methods = list(METHODS)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - set(METHODS)
        if unknown:
            p.error(f"--only: unknown method(s) {sorted(unknown)}; choose from {','.join(METHODS)}")
        methods = ["plain"] + [m for m in METHODS if m in wanted and m != "plain"]
    if not Path(args.data).is_file():
        p.error(f"--data: {args.data} does not exist; pass an .npz of images or set DARTSNAS_DATA")
    machine = cpu_description()
    print(f"{machine['cpu']} ({machine['cpu_flags']}; torch {machine['torch']}, {args.threads} threads)", flush=True)
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        times = {}
        for method in order:
            times[method] = step_seconds(method, args)
            print(f"round {r + 1}: {method:<20} {times[method]:7.3f} s/step", flush=True)
        rounds.append(times)
    summary = {}
    print(f"\n{'method':<20} {'s/step (median)':>16} {'x plain (median of rounds)':>28}")
    for method in methods:
        seconds = statistics.median(t[method] for t in rounds)
        ratio = statistics.median(t[method] / t["plain"] for t in rounds)
        summary[method] = {"s_per_step": seconds, "x_plain": ratio}
        print(f"{method:<20} {seconds:16.3f} {ratio:28.2f}")
    if args.json:
        settings = {k: getattr(args, k) for k in ("rounds", "steps", "batch", "size", "threads")}
        Path(args.json).write_text(json.dumps({"machine": machine, "settings": settings, "rounds": rounds,
                                               "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
