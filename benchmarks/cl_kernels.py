"""Time the CPU kernels of a channels-last search against the alternatives dartsnas avoids.

Four comparisons, each forward and backward of one operation, the two ways alternating within the
process (median over repeats), on shapes of the search network (batch 32, 32x32 down to 8x8):

* ``bn``: batch norm without affine parameters of few channels, PyTorch's channels-last kernel
  against the wide view of :mod:`dartsnas.ops.widebn`;
* ``grad``: PyTorch's batch-norm backward with a contiguous gradient of a channels-last output, as
  it arrives through a reshape, against the gradient first copied into the output's format
  (:mod:`dartsnas.ops.lean`);
* ``reduce``: the factorized reduce's 1x1 stride-2 convolutions (unshifted and shifted by a pixel)
  against stride-1 convolutions of every second pixel (:func:`dartsnas.ops.cnn.pointwise_stride2`);
* ``taps``: depthwise convolutions of the search operations on maps smaller than the kernel's reach
  (a small search network's last cells), the full kernel against the kernel cropped to the taps that
  read the input (:mod:`dartsnas.ops.livetaps`), both with the search's flipped backward; forward
  alone and forward with backward.

    python benchmarks/cl_kernels.py
    python benchmarks/cl_kernels.py --what bn --repeats 50

Prints the CPU model and PyTorch's CPU capability with a markdown table. Run by hand; figures go to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dartsnas.ops import fastconv, lean, livetaps, widebn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pc_darts import cpu_model

CL = torch.channels_last


def _time(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median microseconds of each function, called in turn ``repeats`` times after a warm-up."""
    for f in fns:
        for _ in range(3):
            f()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            samples[i].append(time.perf_counter() - t)
    return [statistics.median(s) * 1e6 for s in samples]


def _bn(x: torch.Tensor, g: torch.Tensor, wide: bool) -> Callable[[], object]:
    saved = widebn.columns

    def run() -> object:
        if not wide:
            widebn.columns = lambda t: 0  # type: ignore[assignment]
        try:
            y = lean._BatchNormKeepOutput.apply(x, None, None, 0.0, 1e-5)
            return torch.autograd.grad(y, x, g)
        finally:
            widebn.columns = saved

    return run


def bench_bn(repeats: int) -> list[str]:
    rows = ["| shape (N, C, H, W) | PyTorch's kernel (us) | wide view (us) | speed-up |", "|---|---|---|---|"]
    for shape in [(32, 4, 32, 32), (32, 8, 32, 32), (32, 12, 32, 32), (32, 8, 16, 16), (32, 24, 16, 16),
                  (32, 20, 32, 32), (64, 4, 32, 32), (32, 16, 32, 32)]:
        x = torch.randn(*shape).contiguous(memory_format=CL).requires_grad_()
        g = torch.randn(*shape).contiguous(memory_format=CL)
        if not widebn.columns(x.detach()):
            native = _time([_bn(x, g, False)], repeats)[0]
            rows.append(f"| {shape} | {native:.0f} | (not used) | |")
            continue
        native, wide = _time([_bn(x, g, False), _bn(x, g, True)], repeats)
        rows.append(f"| {shape} | {native:.0f} | {wide:.0f} | {native / wide:.2f}x |")
    return rows


def _grad_pair(shape: tuple[int, ...]) -> list[Callable[[], object]]:
    out = torch.randn(*shape).contiguous(memory_format=CL)
    invstd = torch.rand(shape[1]) + 0.5
    zeros, ones = torch.zeros(shape[1]), torch.ones(shape[1])
    g = torch.randn(*shape)  # contiguous

    def backward(grad: torch.Tensor) -> object:
        return torch.ops.aten.native_batch_norm_backward(grad, out, invstd, None, None, zeros, ones, True, 0.0,
                                                         [True, False, False])

    return [lambda: backward(g), lambda: backward(g.contiguous(memory_format=CL))]


def bench_grad(repeats: int) -> list[str]:
    rows = ["| shape (N, C, H, W) | contiguous gradient (us) | converted first (us) | speed-up |", "|---|---|---|---|"]
    for shape in [(32, 32, 16, 16), (32, 64, 8, 8), (32, 16, 32, 32), (64, 16, 32, 32)]:
        a, b = _time(_grad_pair(shape), repeats)
        rows.append(f"| {shape} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    return rows


def _reduce_pair(shape: tuple[int, ...], fmt: torch.memory_format, shift: int) -> list[Callable[[], object]]:
    x = torch.randn(*shape).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(shape[1] // 2, shape[1], 1, 1).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn(shape[0], shape[1] // 2, shape[2] // 2, shape[3] // 2).contiguous(memory_format=fmt)

    def strided() -> object:
        return torch.autograd.grad(F.conv2d(x[:, :, shift:, shift:] if shift else x, w, None, 2), (x, w), g)

    def sampled() -> object:
        return torch.autograd.grad(F.conv2d(x[:, :, shift::2, shift::2], w), (x, w), g)

    return [strided, sampled]


def bench_reduce(repeats: int) -> list[str]:
    rows = ["| input (N, C, H, W), format | half | stride 2 (us) | stride 1, every second pixel (us) | speed-up |",
            "|---|---|---|---|---|"]
    for shape in [(32, 16, 32, 32), (64, 16, 32, 32), (32, 64, 32, 32), (64, 64, 32, 32), (32, 128, 16, 16)]:
        for fmt, name in ((CL, "channels-last"), (torch.contiguous_format, "contiguous")):
            for shift in (0, 1):
                a, b = _time(_reduce_pair(shape, fmt, shift), repeats)
                half = "shifted" if shift else "unshifted"
                rows.append(f"| {shape}, {name} | {half} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    return rows


def _taps_pair(shape: tuple[int, ...], k: int, d: int, s: int, backward: bool) -> list[Callable[[], object]]:
    x = torch.randn(*shape).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(shape[1], 1, k, k).contiguous(memory_format=CL).requires_grad_()
    p = d * (k - 1) // 2
    g = F.conv2d(x.detach(), w.detach(), None, s, p, d, shape[1]) if backward else None
    crop = livetaps.crop

    def run(cropped: bool) -> object:
        livetaps.crop = crop if cropped else (lambda weight, size, stride, padding, dilation:
                                              (weight, tuple(padding), tuple(dilation)))
        try:
            y = fastconv.conv2d(x, w, (s, s), (p, p), (d, d), shape[1])
            return torch.autograd.grad(y, (x, w), g) if backward else y
        finally:
            livetaps.crop = crop

    return [lambda: run(False), lambda: run(True)]


def bench_taps(repeats: int) -> list[str]:
    rows = ["| input (N, C, H, W) | kernel | pass | full kernel (us) | cropped (us) | speed-up |", "|---|---|---|---|---|---|"]
    for shape, k, d, s in [((32, 128, 2, 2), 5, 2, 1), ((32, 128, 2, 2), 3, 2, 1), ((32, 128, 2, 2), 5, 1, 1),
                           ((32, 128, 4, 4), 5, 2, 2), ((32, 64, 4, 4), 5, 2, 1), ((64, 64, 4, 4), 5, 2, 1)]:
        kind = f"{k}x{k}" + (f", dilation {d}" if d > 1 else "") + (f", stride {s}" if s > 1 else "")
        for backward in (False, True):
            a, b = _time(_taps_pair(shape, k, d, s, backward), repeats)
            rows.append(f"| {shape} | {kind} | {'forward and backward' if backward else 'forward'} | {a:.0f} | {b:.0f} "
                        f"| {a / b:.2f}x |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="bn,grad,reduce,taps", help="comma-separated: bn, grad, reduce, taps")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU: {cpu_model()}; PyTorch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"{args.threads} threads; forward and backward, median of {args.repeats}\n")
    benches = {"bn": bench_bn, "grad": bench_grad, "reduce": bench_reduce, "taps": bench_taps}
    for name in args.what.split(","):
        if name not in benches:
            raise SystemExit(f"--what: unknown comparison {name!r}; choose from {', '.join(benches)}")
        print("\n".join(benches[name](args.repeats)) + "\n", flush=True)


if __name__ == "__main__":
    main()
