"""A faster backward for the depthwise convolutions of the separable and dilated operations.

For a stride-1 convolution whose padding keeps the size (``2 p = d (k - 1)`` in each dimension), the
gradient with respect to the input is the same convolution of the output gradient with the kernel
flipped in both spatial dimensions:
``dx[m] = sum_i w[i] g[m - d i + p] = sum_j w[k-1-j] g[m + d j - p]``. PyTorch's CPU backward
(oneDNN, channels-last) computes that input gradient 5 to 14 times slower than the forward
convolution for 5x5 and dilated depthwise kernels, the ones in ``sep_conv_5x5``, ``dil_conv_3x3``
and ``dil_conv_5x5``; the flipped forward takes the forward's time. The weight gradient stays
PyTorch's (for a dilated kernel, PyTorch's undilated one: below). Every backward pass of the search and of training goes through these convolutions.

The dilated convolutions that stride (the reduction cells' edges from their inputs) are worse: 25 to
40 ms for an input gradient whose forward takes 0.2 ms. A stride-2 convolution is the stride-1 one
read at even positions, so with the output gradient spread onto the input grid (zeros between,
``g_up[2o] = g[o]``) both gradients are those of the stride-1 convolution at ``g_up``: the flipped
convolution for the input, PyTorch's stride-1 weight gradient (3x faster than its strided one).

The weight gradient of a dilated convolution is the slowest part left (on an AVX2-only CPU 20 to
100 ms at the search network's sizes, against 2 to 10 ms for the undilated one of the same size), and
it needs no dilated kernel: with ``p = d q`` and ``H``, ``W`` multiples of ``d``, the output at
``(d h + r, d w + s)`` only reads the input at the same phase ``(r, s)``, so a dilation-``d``
convolution is an undilated one (padding ``q``) of each of the ``d * d`` phase images
``x[..., r::d, s::d]``, and its weight gradient is the undilated weight gradient over the phases
stacked as a batch. A stride-``d`` dilated convolution reads phase ``(0, 0)`` only: it is the
undilated convolution of ``x[..., ::d, ::d]``, whose input gradient lands on that phase. Both are
the same sums, regrouped (the forward is unchanged).

The backward is written with differentiable operations, so a double backward through it (the exact
Hessian-vector product) is exact; :func:`lean.plain` switches it off like the lean operations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import lean, livetaps


class _FlippedBackwardConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, stride: int, padding: tuple[int, int],
                dilation: tuple[int, int], groups: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        if _by_phases(x, stride, padding, dilation):
            return (*_phase_backward(ctx, x, weight, grad, stride, padding, dilation[0], groups), None, None, None, None)
        if stride > 1:
            spread = torch.zeros_like(x, dtype=grad.dtype)  # in x's memory format
            spread[..., ::stride, ::stride] = grad
            grad = spread
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = F.conv2d(grad, weight.flip(-1, -2), None, 1, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            dw = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], list(padding), list(dilation),
                                                     False, [0, 0], groups, [False, True, False])[1]
        return dx, dw, None, None, None, None


def _by_phases(x: Tensor, stride: int, padding: tuple[int, int], dilation: tuple[int, int]) -> bool:
    """Whether the backward can run undilated on phase images (module docstring): the same dilation
    ``d > 1`` in both dimensions, and stride ``d``, or stride 1 on a map whose sides are multiples of ``d``."""
    d = dilation[0]
    if d < 2 or dilation[1] != d or padding[0] % d or padding[1] % d:
        return False
    return stride == d or (stride == 1 and x.shape[-2] % d == 0 and x.shape[-1] % d == 0)


def _phases(t: Tensor, d: int) -> Tensor:
    """``(N, C, H, W)`` to ``(d * d * N, C, H / d, W / d)``: phase ``(r, s)``, i.e. ``t[..., r::d, s::d]``, is
    batch block ``r * d + s``; one copy, in ``t``'s memory format (channels-last stays channels-last)."""
    n, c, h, w = t.shape
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        nhwc = t.permute(0, 2, 3, 1).reshape(n, h // d, d, w // d, d, c)
        return nhwc.permute(2, 4, 0, 1, 3, 5).reshape(d * d * n, h // d, w // d, c).permute(0, 3, 1, 2)
    return t.reshape(n, c, h // d, d, w // d, d).permute(3, 5, 0, 1, 2, 4).reshape(d * d * n, c, h // d, w // d)


def _phase_backward(ctx: Any, x: Tensor, weight: Tensor, grad: Tensor, stride: int, padding: tuple[int, int], d: int,
                    groups: int) -> tuple[Tensor | None, Tensor | None]:
    """Input and weight gradients of the dilated convolution through undilated ones (module docstring)."""
    pad = [padding[0] // d, padding[1] // d]
    dx = dw = None
    if stride == d:  # the convolution of phase (0, 0) with the undilated kernel
        xs, gs = x[..., ::d, ::d], grad
        if ctx.needs_input_grad[0]:
            dx = torch.zeros_like(x, dtype=grad.dtype)  # in x's memory format
            dx[..., ::d, ::d] = F.conv2d(grad, weight.flip(-1, -2), None, 1, pad, 1, groups)
    else:
        xs, gs = _phases(x, d), _phases(grad, d)
        if ctx.needs_input_grad[0]:  # the flipped dilated convolution is as fast as the forward
            dx = F.conv2d(grad, weight.flip(-1, -2), None, 1, padding, d, groups)
    if ctx.needs_input_grad[1]:
        dw = torch.ops.aten.convolution_backward(gs, xs, weight, None, [1, 1], pad, [1, 1], False, [0, 0], groups,
                                                 [False, True, False])[1]
    return dx, dw


def qualifies(conv: nn.Conv2d) -> bool:
    """A bias-free depthwise convolution larger than 1x1 whose zero padding keeps the size at stride
    1: stride 1, or stride 2 when dilated (where PyTorch's strided backward is slowest)."""
    k, d, p, s = conv.kernel_size, conv.dilation, conv.padding, conv.stride
    strides_ok = s == (1, 1) or (s == (2, 2) and d[0] > 1 and d[1] > 1)
    return (conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1 and conv.bias is None
            and strides_ok and conv.padding_mode == "zeros" and not isinstance(p, str)
            and all(2 * p[i] == d[i] * (k[i] - 1) for i in range(2)) and k != (1, 1))


class FlippedBackwardConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose input gradient is the flipped-kernel convolution (module docstring).
    Parameter names are the parent's; anything :func:`qualifies` rejects runs the parent's code."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            return super().forward(x)
        return conv2d(x, self.weight, self.stride, self.padding, self.dilation, self.groups)


def conv2d(x: Tensor, weight: Tensor, stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...],
           groups: int, flipped: bool = True) -> Tensor:
    """A bias-free, zero-padded convolution of a 4-D ``x`` with the kernel cropped to the taps that can
    reach it (ops/livetaps.py) and, when ``flipped`` and a graph is built, the backward above."""
    weight, pad, dil = livetaps.crop(weight, x.shape[-2:], stride, padding, dilation)
    # Under autocast PyTorch's own convolution handles the casts of both passes.
    if flipped and lean.builds_graph(x, weight) and not torch.is_autocast_enabled(x.device.type):
        return _FlippedBackwardConv.apply(x, weight, stride[0], pad, dil, groups)
    return F.conv2d(x, weight, None, stride, pad, dil, groups)


def use_flipped_backward(model: nn.Module) -> int:
    """Give every qualifying depthwise convolution of ``model`` the flipped-kernel backward, in
    place (the module keeps its parameters); returns how many were converted."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Conv2d and qualifies(m):
            m.__class__ = FlippedBackwardConv2d
            n += 1
    return n
