"""Time one full CNN search step (alpha step + weight step) and its peak memory.

The paper's search network (C=16, 8 cells, 32x32 input, 10 classes) at batch 16 and 64, first and
second order (finite-difference HVP), on the CPU with all cores by default. Each configuration
runs in its own process so that peak memory (max RSS, or peak CUDA memory on a GPU) is its own.

    python benchmarks/search_step.py                       # the whole table
    python benchmarks/search_step.py --batches 16 --orders 1 --steps 3
    python benchmarks/search_step.py --json results.json   # also write the figures as JSON
    python benchmarks/search_step.py --checkpoint_cells    # cells recomputed in the backward

Run by hand; figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def one(order: int, batch: int, steps: int, device: str, hvp: str, threads: int, channels_last: str,
        checkpoint_cells: bool = False, layers: int = 8, settings: dict | None = None) -> dict:
    """Median seconds per step and peak memory of ``steps`` search steps; ``settings``: further SearchConfig fields."""
    import torch

    from dartsnas.data.images import ImageData, ImageSet
    from dartsnas.engine.search_cnn import SearchConfig, build_search, use_channels_last, weight_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    # The process before the search network exists (interpreter, torch): subtracted for "search_gib".
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 if dev.type == "cpu" else 0.0
    cfg = SearchConfig(unrolled=order == 2, hvp=hvp, channels_last=channels_last, checkpoint_cells=checkpoint_cells,
                       layers=layers, **(settings or {}))
    cfg.validate()
    data = ImageData("bench", ImageSet(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)),
                     None, 10, (0.5,) * 3, (0.25,) * 3, pad=4, flip=True)
    model, w_opt, _, architect = build_search(cfg, data, dev)
    fmt = torch.channels_last if use_channels_last(cfg.channels_last, dev) else torch.contiguous_format
    x_t = torch.randn(batch, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    x_v = torch.randn(batch, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    y_t, y_v = torch.randint(0, 10, (batch,), device=dev), torch.randint(0, 10, (batch,), device=dev)
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        architect.step((x_t, y_t), (x_v, y_v), cfg.learning_rate)
        weight_step(model, w_opt, x_t, y_t, cfg.grad_clip)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"order": order, "batch": batch, "median_s": statistics.median(times), "steps": steps,
            "peak_gib": peak, "search_gib": peak - base, "device": device, "hvp": hvp, "threads": threads, "channels_last": channels_last,
            "checkpoint_cells": checkpoint_cells,
            "fuse_edges": (settings or {}).get("fuse_edges", "auto")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="16,64")
    p.add_argument("--orders", default="1,2")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--hvp", default="fd", choices=["fd", "exact"])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--channels_last", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--checkpoint_cells", action="store_true",
                   help="recompute each cell's activations in the backward (less memory, slower steps)")
    p.add_argument("--fuse_edges", default="auto", choices=["auto", "on", "off"],
                   help="the search's --fuse_edges (auto: fused for small networks on the CPU)")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: "order,batch" in a child process
    args = p.parse_args()
    if args.one:
        order, batch = map(int, args.one.split(","))
        print(json.dumps(one(order, batch, args.steps, args.device, args.hvp, args.threads, args.channels_last,
                             args.checkpoint_cells, settings={"fuse_edges": args.fuse_edges})))
        return
    rows = []
    failed = False
    for batch in map(int, args.batches.split(",")):
        for order in map(int, args.orders.split(",")):
            cmd = [sys.executable, __file__, "--one", f"{order},{batch}", "--steps", str(args.steps), "--device",
                   args.device, "--hvp", args.hvp, "--threads", str(args.threads), "--channels_last", args.channels_last]
            if args.checkpoint_cells:
                cmd.append("--checkpoint_cells")
            cmd += ["--fuse_edges", args.fuse_edges]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                print(f"order {order} batch {batch} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                failed = True
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"order {order}  batch {batch:3d}  median {row['median_s']:8.3f} s/step  "
                  f"peak {row['peak_gib']:6.2f} GiB  ({args.device}, {args.threads} threads, hvp={args.hvp}, "
                  f"channels_last={args.channels_last}, checkpoint_cells={args.checkpoint_cells})",
                  flush=True)
    if args.json:
        import torch

        meta = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                "torch": torch.__version__, "python": platform.python_version()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
