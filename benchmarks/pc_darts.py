"""PC-DARTS's partial channels (Xu et al. 2020, section 3.2): time and peak memory of a search step, K=1 vs K=4.

A first-order search step (alpha step + weight step, :func:`search_step.one`) of a small but realistic search
network (C=16, 5 cells, batch 32, random 32x32 images), each setting in its own process so that its peak memory
(max RSS on the CPU, peak allocated memory on CUDA) is its own. On the CPU the memory is given twice: the whole
process's peak, and that peak less the process before the network was built (interpreter and torch, the same for
every setting). Prints both settings, the ratios K=4 / K=1 and the CPU model.

    python benchmarks/pc_darts.py
    python benchmarks/pc_darts.py --steps 5 --threads 2 --edge_normalization
    python benchmarks/pc_darts.py --rounds 3 --fuse_edges on   # alternating rounds, median of the ratios
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_step import one


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown (no lscpu)"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def run_one(k: int, args: argparse.Namespace) -> dict:
    """One setting's steps in a fresh process, so that its peak memory is its own."""
    cmd = [sys.executable, __file__, "--one", str(k), "--batch", str(args.batch), "--layers", str(args.layers),
           "--steps", str(args.steps), "--device", args.device, "--threads", str(args.threads),
           "--fuse_edges", args.fuse_edges]
    if args.edge_normalization:
        cmd.append("--edge_normalization")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"K={k} failed: {(out.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="1,4", help="partial-channel settings to compare (the first is the reference)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds of all settings in turn (the order alternating); ratios are the median over rounds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--fuse_edges", default="auto", choices=("auto", "on", "off"),
                   help="the search cell's --fuse_edges for every setting")
    p.add_argument("--edge_normalization", action="store_true", help="PC-DARTS's edge normalisation on for K > 1")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: K in a child process
    args = p.parse_args()
    if args.one is not None:
        settings = {"partial_channels": args.one, "edge_normalization": args.edge_normalization and args.one > 1,
                    "fuse_edges": args.fuse_edges}
        print(json.dumps(one(1, args.batch, args.steps, args.device, "fd", args.threads, "auto", layers=args.layers,
                             settings=settings)))
        return
    ks = [int(k) for k in args.ks.split(",")]
    print(f"CPU: {cpu_model()}; {args.threads} threads; device {args.device}; C=16, {args.layers} cells, "
          f"batch {args.batch}, first order, --fuse_edges {args.fuse_edges}, {args.steps} timed steps, "
          f"{args.rounds} round(s)", flush=True)
    rows: dict[int, list[dict]] = {k: [] for k in ks}
    for r in range(args.rounds):
        for k in (ks if r % 2 == 0 else ks[::-1]):
            row = run_one(k, args)
            rows[k].append(row)
            print(f"round {r + 1}, K={k}: median {row['median_s']:.3f} s/step, peak {row['peak_gib']:.3f} GiB "
                  f"({row['search_gib']:.3f} GiB above the process before the network was built)", flush=True)
    ref = ks[0]
    for k in ks[1:]:
        speed = [a["median_s"] / b["median_s"] for a, b in zip(rows[ref], rows[k])]
        peak = [b["peak_gib"] / a["peak_gib"] for a, b in zip(rows[ref], rows[k])]
        own = [b["search_gib"] / a["search_gib"] for a, b in zip(rows[ref], rows[k])]
        print(f"K={k} vs K={ref}, median over rounds: {statistics.median(speed):.2f}x faster "
              f"(rounds: {', '.join(f'{v:.2f}' for v in speed)}), {statistics.median(peak):.2f}x the peak memory, "
              f"{statistics.median(own):.2f}x the search's own memory")


if __name__ == "__main__":
    main()
