"""The CNN search step of the authors' code and of dartsnas, side by side, alternating over several rounds.

Each round times the authors' step (quark0/darts, through ``../shared/tools/reference_bench.py``) and
ours (``benchmarks/search_step.py``), each in its own process with the same thread count, batch and
order; the round's ratio is original / ours (above 1: ours is faster). Which of the two runs first
alternates from round to round, so that a slow drift of the shared machine weighs on both alike.
The median of the per-round ratios is the figure to quote: a single pair, or a comparison with
another day's numbers, says little on a shared machine.

    python benchmarks/side_by_side.py --ref DIR                        # 5 rounds, batch 64, first order
    python benchmarks/side_by_side.py --ref DIR --rounds 3 --batch 16 --order 2 --steps 2
    python benchmarks/side_by_side.py --ref DIR --json side_by_side.json

``--ref DIR`` is the authors' code extracted outside the project (see ``../shared/tools/README.md``).
Run by hand; figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_BENCH = HERE.parent.parent / "shared" / "tools" / "reference_bench.py"
# The CPU features that decide which kernels PyTorch and oneDNN use.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_description() -> dict[str, str]:
    """The CPU model, its vector-instruction flags and the kernels PyTorch picked on it."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    import torch

    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return {"cpu": model, "cpu_flags": " ".join(f for f in SIMD_FLAGS if f in flags) or "unknown",
            "torch_cpu_capability": capability, "cores": str(len(os.sched_getaffinity(0))),
            "torch": torch.__version__, "python": platform.python_version()}


def original(args: argparse.Namespace) -> float:
    """Median seconds per step of the authors' code (one reference_bench.py run)."""
    with tempfile.TemporaryDirectory() as out:
        result = Path(out) / "cnn.json"
        cmd = [sys.executable, str(args.bench), "--ref", args.ref, "--out", out, "--only", "cnn",
               "--cnn-batches", str(args.batch), "--cnn-orders", str(args.order), "--cnn-steps", str(args.steps),
               "--cnn-min-steps", str(args.steps), "--warmup", "1", "--timeout", str(args.timeout),
               "--results-json", str(result)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        runs = json.loads(result.read_text())["runs"] if result.is_file() else []
        row = next((r for r in runs if r.get("kind") == "cnn_step"), None)
        if done.returncode or row is None:
            error = runs[0].get("error") if runs else done.stderr[-1000:]
            raise SystemExit(f"the original's step failed: {error}")
        return float(row["step_s"]["median"])


def ours(args: argparse.Namespace) -> float:
    """Median seconds per step of dartsnas (one search_step.py configuration, in its own process)."""
    cmd = [sys.executable, str(HERE / "search_step.py"), "--one", f"{args.order},{args.batch}", "--steps",
           str(args.steps), "--threads", str(args.threads), "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, timeout=args.timeout)
    if done.returncode:
        raise SystemExit(f"our step failed:\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["median_s"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="the authors' code, extracted (holds cnn/)")
    p.add_argument("--bench", default=str(DEFAULT_BENCH), help="reference_bench.py (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: 5)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--order", type=int, default=1, choices=(1, 2), help="1: first order, 2: second order")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run, after one warm-up (default: 3)")
    p.add_argument("--threads", type=int, default=2,
                   help="threads of our step; the original runs with reference_bench.py's own (2)")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed to each run")
    p.add_argument("--json", help="also write the rounds and the summary to this file")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.batch < 1:
        p.error("--rounds, --steps and --batch must be at least 1")
    if not Path(args.bench).is_file():
        p.error(f"{args.bench} not found; pass --bench PATH/reference_bench.py")
    if not (Path(args.ref) / "cnn" / "model_search.py").is_file():
        p.error(f"{args.ref} does not hold the authors' code (cnn/model_search.py); see shared/tools/README.md")

    machine = cpu_description()
    settings = {"batch": args.batch, "order": args.order, "steps": args.steps, "threads": args.threads,
                "rounds": args.rounds}
    print(f"cpu: {machine['cpu']} ({machine['cores']} cores available)")
    print(f"cpu flags: {machine['cpu_flags']}; torch {machine['torch']} kernels: {machine['torch_cpu_capability']}")
    print("settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()), flush=True)
    rounds = []
    for r in range(args.rounds):
        # Alternate which runs first, so that a drift of the machine's speed weighs on both.
        first, second = (original, ours) if r % 2 == 0 else (ours, original)
        times = {first.__name__: first(args), second.__name__: second(args)}
        ratio = times["original"] / times["ours"]
        rounds.append({"round": r + 1, "first": first.__name__, **times, "ratio": ratio})
        print(f"round {r + 1}: original {times['original']:.3f} s/step, ours {times['ours']:.3f} s/step, "
              f"ratio {ratio:.2f}x ({first.__name__} first)", flush=True)
    ratios = [row["ratio"] for row in rounds]
    summary = {"median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios)}
    print(f"median of the per-round ratios (original / ours): {summary['median_ratio']:.2f}x "
          f"(range {summary['min_ratio']:.2f}x to {summary['max_ratio']:.2f}x over {len(ratios)} rounds)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "settings": settings, "rounds": rounds,
                                               "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
