"""Count the ATen operator calls of one CNN search step, edge by edge and with fused edges.

Per-call overhead dominates small search networks, so the number of operator calls a step issues is a
machine-independent measure of that overhead. A step is the first-order alpha step plus the weight
step; the count is the number of ``aten::`` events torch.profiler records for it (nested calls
included), after one warm-up step. Deterministic: no timing is involved.

    python benchmarks/kernel_count.py                      # quickstart and paper networks
    python benchmarks/kernel_count.py --networks quickstart

Run by hand; figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from dartsnas.data.images import ImageData, ImageSet
from dartsnas.engine.search_cnn import SearchConfig, build_search, use_channels_last, weight_step

# name: (init_channels, layers, batch, image size, input channels, settings)
NETWORKS = {
    # --config search-cnn-digits: 8x8 grey digits
    "quickstart": (8, 5, 32, 8, 1),
    # paper section 3.1.1: CIFAR-10
    "paper": (16, 8, 64, 32, 3),
}


def search_setup(spec: tuple[int, int, int, int, int], threads: int, **settings: object) -> tuple[Any, ...]:
    """``(cfg, model, w_opt, architect, x, y)``: the search of a network given as in :data:`NETWORKS`,
    on the CPU with ``threads`` threads, and a random batch for it (also used by step_phases.py)."""
    C, layers, batch, size, in_channels = spec
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = SearchConfig(init_channels=C, layers=layers, batch_size=batch, **settings)
    cfg.validate()
    data = ImageData("bench", ImageSet(torch.zeros(1, in_channels, size, size, dtype=torch.uint8),
                                       torch.zeros(1, dtype=torch.long)), None, 10, (0.5,) * in_channels,
                     (0.25,) * in_channels, pad=0, flip=False)
    model, w_opt, _, architect = build_search(cfg, data, torch.device("cpu"))
    # In the memory format the search gives its batches (channels-last on the CPU).
    fmt = torch.channels_last if use_channels_last(cfg.channels_last, torch.device("cpu")) else torch.contiguous_format
    x = torch.randn(batch, in_channels, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    return cfg, model, w_opt, architect, x, y


def count(network: str, fused: bool, threads: int = 2, **settings: object) -> int:
    """ATen calls of one first-order search step of ``network``."""
    cfg, model, w_opt, architect, x, y = search_setup(NETWORKS[network], threads, fuse_edges="on" if fused else "off",
                                                      **settings)

    def step() -> None:
        architect.step((x, y), (x, y), cfg.learning_rate)
        weight_step(model, w_opt, x, y, cfg.grad_clip)

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", default=",".join(NETWORKS))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    for network in args.networks.split(","):
        edge, fused = count(network, False, args.threads), count(network, True, args.threads)
        print(f"{network:10s}  edge by edge {edge:8d}  fused {fused:8d}  {edge / fused:5.2f}x fewer", flush=True)


if __name__ == "__main__":
    main()
