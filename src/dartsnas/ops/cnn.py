"""The convolutional operations (paper sections 2.1 and 3.1.1; the authors' code, cnn/operations.py).

Every operation is ReLU-Conv-BN. ``OPS[name](C, stride, affine)`` builds one; ``affine=False``
during search (the mixed operation rescales the outputs anyway, and learnable BN scales would
interfere with alpha) and ``affine=True`` in final networks. Submodule names follow the authors'
code so that their released checkpoints load into our final networks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ReLUConvBN(nn.Module):
    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class DilConv(nn.Module):
    """ReLU, depthwise dilated conv, pointwise conv, BN."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=C_in,
                      bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class SepConv(nn.Module):
    """The separable block applied twice (NASNet convention); only the first one strides."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=stride, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, 1, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=1, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Zero(nn.Module):
    """The ``none`` operation. The mixed operation skips it (it adds exactly zero); final networks
    never contain it. Kept so that ``OPS`` covers every primitive."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution with two 1x1 stride-2 convolutions, the second on the input shifted by
    one pixel, so that every input pixel is seen by one of them (NASNet)."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_after_relu(self.relu(x))

    def forward_after_relu(self, x: torch.Tensor) -> torch.Tensor:
        a = pointwise_stride2(x, self.conv_1.weight)
        b = pointwise_stride2(x, self.conv_2.weight, shift=1)
        if b.shape[-2:] != a.shape[-2:]:
            # Odd spatial sizes: the shifted branch is one pixel short; pad it back (the authors'
            # code only ever sees even sizes, where this never triggers).
            b = nn.functional.pad(b, (0, a.shape[-1] - b.shape[-1], 0, a.shape[-2] - b.shape[-2]))
        return self.bn(torch.cat([a, b], dim=1))


class Conv7x1_1x7(nn.Module):
    def __init__(self, C: int, stride: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
            nn.Conv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
            nn.BatchNorm2d(C, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def _skip(C: int, stride: int, affine: bool) -> nn.Module:
    return nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine)


OpFactory = Callable[[int, int, bool], nn.Module]

OPS: dict[str, OpFactory] = {
    "none": lambda C, stride, affine: Zero(stride),
    # Average pooling excludes the zero padding from the mean (the authors' code, cnn/operations.py:
    # count_include_pad=False).
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": _skip,
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine),
    "sep_conv_7x7": lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine=affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine),
    "conv_7x1_1x7": lambda C, stride, affine: Conv7x1_1x7(C, stride, affine=affine),
}


def starts_with_relu(op: nn.Module) -> bool:
    """Whether ``op`` begins with a ReLU that :func:`forward_after_relu` can skip."""
    if isinstance(op, FactorizedReduce):
        return True
    seq = getattr(op, "op", None)
    return isinstance(seq, nn.Sequential) and isinstance(seq[0], nn.ReLU)


def forward_after_relu(op: nn.Module, x_relu: torch.Tensor) -> torch.Tensor:
    """``op(x)`` given ``relu(x)``: lets every operation on the same input share one ReLU."""
    if isinstance(op, FactorizedReduce):
        return op.forward_after_relu(x_relu)
    seq = op.op  # type: ignore[attr-defined]
    for k in range(1, len(seq)):
        x_relu = seq[k](x_relu)
    return x_relu


def pointwise_stride2(x: torch.Tensor, weight: torch.Tensor, groups: int = 1, shift: int = 0) -> torch.Tensor:
    """The bias-free 1x1 stride-2 convolution of ``x[:, :, shift:, shift:]`` (the factorized reduce's
    two halves, ``shift`` 0 and 1).

    A 1x1 kernel reads only the pixels it lands on, so this is also the stride-1 convolution of every
    second pixel, ``x[:, :, shift::2, shift::2]``: the same values. On the CPU that form is used

    * for the shifted half, whose stride-2 form (on a strided slice) takes 2 to 6 times longer forward
      and backward (benchmarks/RESULTS.md, "The factorized reduce");
    * without channels-last, where it is faster for both halves;
    * for an ungrouped convolution of fewer than 16 input channels in channels-last, where oneDNN (as
      in PyTorch 2.14's CPU build) corrupts the heap computing the stride-2 weight gradient (crashes
      from 64x64 maps on, with 2 to 12 channels; grouped ones and 16 channels or more are fine).

    Elsewhere (the unshifted half of wider channels-last inputs, and CUDA) the stride-2 convolution.
    """
    if x.device.type == "cpu":
        channels_last = x.stride(1) == 1 and x.shape[1] > 1
        if shift or not channels_last or (groups == 1 and weight.shape[1] < 16):
            return F.conv2d(x[:, :, shift::2, shift::2], weight, None, 1, 0, 1, groups)
    return F.conv2d(x[:, :, shift:, shift:] if shift else x, weight, None, 2, 0, 1, groups)
