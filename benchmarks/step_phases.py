"""Where a first-order CNN search step's time goes: the alpha step, the weight step's forward and
backward, its gradient clipping and its SGD update.

The networks are :mod:`kernel_count`'s (the quickstart's and the paper's) and :mod:`pc_darts`'s
(C=16, 5 cells, batch 32, 32x32; with ``--partial_channels``), in the search's memory format, on
random data; each phase is timed on its own (the CPU is synchronous) and the median over
the steps after two warm-up steps is printed with the CPU model.

    python benchmarks/step_phases.py                          # the quickstart network, 12 steps
    python benchmarks/step_phases.py --network paper --steps 5
    python benchmarks/step_phases.py --network pc-darts --partial_channels 4 --steps 5

To compare with an earlier revision, extract it (``git archive REV | tar -x -C /tmp/base``) and run
``PYTHONPATH=/tmp/base/src python benchmarks/step_phases.py`` and this tree in turn. Run by hand;
figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_count import NETWORKS as COUNTED
from kernel_count import search_setup
from pc_darts import cpu_model

# name: (init_channels, layers, batch, image size, input channels)
NETWORKS = {**COUNTED, "pc-darts": (16, 5, 32, 32, 3)}  # benchmarks/pc_darts.py's network

try:
    from dartsnas.search.architect import frozen
except ImportError:  # revisions before the first-order step froze the weights in place
    from dartsnas.engine.search_cnn import _frozen as frozen  # type: ignore[attr-defined,no-redef]


def phases(network: str, steps: int, threads: int, partial_channels: int = 1) -> dict[str, float]:
    """Median seconds of each phase of a first-order search step of ``network``."""
    cfg, model, w_opt, architect, x, y = search_setup(NETWORKS[network], threads, partial_channels=partial_channels)
    times: dict[str, list[float]] = {}

    def tick(name: str, start: float) -> float:
        now = time.perf_counter()
        times.setdefault(name, []).append(now - start)
        return now

    for _ in range(steps + 2):
        t = time.perf_counter()
        architect.step((x, y), (x, y), cfg.learning_rate)
        t = tick("alpha step", t)
        with frozen(model.arch_parameters()):
            w_opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            t = tick("weight forward", t)
            loss.backward()
            t = tick("weight backward", t)
            if hasattr(w_opt, "clip_grad_norm_"):
                w_opt.clip_grad_norm_(cfg.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_([p for g in w_opt.param_groups for p in g["params"]], cfg.grad_clip)
            t = tick("clipping", t)
            w_opt.step()
            tick("SGD update", t)
    return {name: statistics.median(v[2:]) for name, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", default="quickstart", choices=sorted(NETWORKS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--partial_channels", type=int, default=1)
    args = p.parse_args()
    result = phases(args.network, args.steps, args.threads, args.partial_channels)
    print(f"CPU: {cpu_model()}; PyTorch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"{args.threads} threads; {args.network} network, --partial_channels {args.partial_channels}, "
          f"median of {args.steps} steps")
    for name, seconds in result.items():
        print(f"{name:16s} {seconds * 1e3:8.1f} ms")
    print(f"{'step':16s} {sum(result.values()) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
