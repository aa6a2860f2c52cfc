"""Convolution kernels cropped to the taps that can reach the input.

With zero padding ``p``, dilation ``d`` and stride ``s``, tap ``a`` of a kernel reads input row
``o * s - p + a * d`` for the output rows ``o = 0 .. out - 1``. On a map smaller than the kernel's
reach some taps only ever read padding: ``dil_conv_5x5`` (5x5, dilation 2, reach 9) on the 2x2 maps of
a small search network's last cells reads the input through its centre tap alone, ``dil_conv_3x3`` and
``sep_conv_5x5`` there through their centre 1x1 and 3x3. Such taps add exact zeros to every output
and receive exact-zero weight gradients, so the convolution with those taps dropped (and as much
padding on each side) has the same output size, the same values and the same gradients; the dropped
taps' gradient is the zero that slicing gives back. PyTorch's CPU convolution (oneDNN) is slow for
kernels that reach far into padding: 1.1 to 1.7 ms for a depthwise 5x5 dilation-2 convolution of 128
channels on a 2x2 map against 0.04 ms for the 1x1 it amounts to, 8 to 22 times the cropped kernel's
time for a dilated 5x5 on 3x3 maps or with stride 2 on 4x4 ones. An undilated kernel is not slow
that way: cropping a 5x5 to 3x3 on a 2x2 map costs a little (the sliced kernel is copied), so it is
cropped only when one tap is left (benchmarks/RESULTS.md, "Kernels cropped to the input"). Maps as
large as the kernel's reach (the paper's 8x8 and larger) keep every tap.
"""

from __future__ import annotations

import functools

from torch import Tensor

Pair = tuple[int, int]


@functools.lru_cache(maxsize=1024)
def cut(kernel: Pair, size: Pair, stride: Pair, padding: Pair, dilation: Pair) -> Pair:
    """How many taps can be dropped from each end of the kernel, per spatial dimension.

    The cut is symmetric (the padding stays the same on both sides) and at most ``p // d``, so that
    the padding left is not negative; 0 when the output would be empty (the convolution's own error)."""
    cuts = []
    for k, n, s, p, d in zip(kernel, size, stride, padding, dilation):
        out = (n + 2 * p - d * (k - 1) - 1) // s + 1
        if out < 1:
            return (0, 0)
        first = -((p - (out - 1) * s) // -d)  # ceil: the first tap whose last read is row >= 0
        last = (n - 1 + p) // d  # the last tap whose first read is row <= n - 1
        cuts.append(max(0, min(first, k - 1 - last, p // d)))
    return cuts[0], cuts[1]


@functools.lru_cache(maxsize=1024)
def _worth_it(kernel: Pair, size: Pair, stride: Pair, padding: Pair, dilation: Pair) -> Pair:
    """:func:`cut` along a dimension where it pays on the CPU (module docstring): a dilated kernel, or
    one left with a single tap; 0 elsewhere."""
    cuts = cut(kernel, size, stride, padding, dilation)
    return tuple(c if d > 1 or k - 2 * c == 1 else 0 for c, k, d in zip(cuts, kernel, dilation))  # type: ignore[return-value]


def crop(weight: Tensor, size: Pair, stride: Pair, padding: Pair, dilation: Pair) -> tuple[Tensor, Pair, Pair]:
    """``weight`` cropped to the taps that can read an input of spatial ``size`` where that pays (a
    view: its gradient reaches the full kernel), the padding that keeps every output in place, and the
    dilation (1 along a dimension left with one tap, where it has no effect)."""
    kh, kw = weight.shape[-2:]
    if kh == kw == 1:
        return weight, padding, dilation
    ch, cw = _worth_it((kh, kw), (int(size[0]), int(size[1])), tuple(stride), tuple(padding), tuple(dilation))
    if not (ch or cw):
        return weight, padding, dilation
    weight = weight[:, :, ch:kh - ch, cw:kw - cw]
    padding = (padding[0] - ch * dilation[0], padding[1] - cw * dilation[1])
    dilation = (1 if kh - 2 * ch == 1 else dilation[0], 1 if kw - 2 * cw == 1 else dilation[1])
    return weight, padding, dilation
