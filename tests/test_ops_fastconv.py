"""Depthwise convolutions whose input gradient is the flipped-kernel convolution (ops/fastconv.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dartsnas.genotype import get_genotype
from dartsnas.models.cnn import build_network
from dartsnas.ops import fastconv, lean
from dartsnas.search.cnn import SearchNetwork

FORMATS = [torch.contiguous_format, torch.channels_last]
SHAPES = [((3, 3), (1, 1), (1, 1), 1), ((5, 5), (1, 1), (2, 2), 1), ((3, 3), (2, 2), (2, 2), 1),
          ((5, 5), (2, 2), (4, 4), 1), ((1, 7), (1, 1), (0, 3), 1), ((3, 5), (3, 1), (3, 2), 1),
          ((3, 3), (2, 2), (2, 2), 2), ((5, 5), (2, 2), (4, 4), 2), ((3, 5), (3, 2), (3, 4), 2)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kernel, dilation, padding, stride", SHAPES)
@pytest.mark.parametrize("size", [(9, 11), (8, 8)])  # odd sizes: the strided output keeps the last row
def test_gradients_match_pytorch_convolution(fmt, kernel, dilation, padding, stride, size):
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 4, kernel, stride=stride, padding=padding, dilation=dilation, groups=4, bias=False).double()
    fast = copy.deepcopy(plain)
    assert fastconv.use_flipped_backward(fast) == 1 and isinstance(fast, fastconv.FlippedBackwardConv2d)
    _assert_same_as_pytorch(plain, fast, torch.randn(3, 4, *size, dtype=torch.float64).contiguous(memory_format=fmt))


def _assert_same_as_pytorch(plain: nn.Conv2d, fast: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same output and the same input and weight gradients (to rounding: on maps smaller than the
    kernel's reach the kernel is cropped, ops/livetaps.py) in float64; returns the fast module's gradients."""
    xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp, yf = plain(xp), fast(xf)
    assert yf.shape == yp.shape
    torch.testing.assert_close(yf, yp, rtol=1e-13, atol=1e-13)
    g = torch.randn_like(yp)
    gp = torch.autograd.grad(yp, [xp, plain.weight], g)
    gf = torch.autograd.grad(yf, [xf, fast.weight], g)
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    return gf


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kernel, dilation, stride, size", [
    (3, 2, 1, (8, 6)), (5, 2, 1, (8, 10)), (3, 3, 1, (9, 12)), (5, 3, 1, (6, 6)),  # stride 1: every phase
    (3, 2, 2, (9, 7)), (5, 2, 2, (8, 8)), (5, 2, 2, (7, 10)),  # stride d = 2: phase (0, 0)
])
def test_dilated_backward_by_phases_matches_pytorch(fmt, kernel, dilation, stride, size):
    """The dilated weight gradient as an undilated one over the phase images (and, at stride d, the
    input gradient on phase (0, 0)) gives PyTorch's gradients, in either memory format."""
    torch.manual_seed(3)
    pad = dilation * (kernel - 1) // 2
    assert fastconv._by_phases(torch.empty(1, 1, *size), stride, (pad, pad), (dilation, dilation))
    plain = nn.Conv2d(3, 3, kernel, stride=stride, padding=pad, dilation=dilation, groups=3, bias=False).double()
    fast = copy.deepcopy(plain)
    assert fastconv.use_flipped_backward(fast) == 1
    x = torch.randn(2, 3, *size, dtype=torch.float64).contiguous(memory_format=fmt)
    gf = _assert_same_as_pytorch(plain, fast, x)
    assert gf[0].is_contiguous(memory_format=fmt)
    # A phase image is the strided view of the input: the layout the backward relies on.
    d = dilation
    if stride == 1:
        phases = fastconv._phases(x, d)
        assert phases.is_contiguous(memory_format=fmt)
        for r in range(d):
            for s in range(d):
                blk = (r * d + s) * x.shape[0]
                assert torch.equal(phases[blk:blk + x.shape[0]], x[..., r::d, s::d])


def test_phases_apply_only_where_exact():
    pad = (2, 2)
    assert not fastconv._by_phases(torch.empty(1, 1, 9, 8), 1, pad, (2, 2))  # odd side at stride 1
    assert fastconv._by_phases(torch.empty(1, 1, 9, 7), 2, pad, (2, 2))  # stride d: any side
    assert not fastconv._by_phases(torch.empty(1, 1, 8, 8), 1, (2, 1), (2, 1))  # unequal dilations
    assert not fastconv._by_phases(torch.empty(1, 1, 8, 8), 1, (1, 1), (1, 1))  # not dilated
    assert not fastconv._by_phases(torch.empty(1, 1, 8, 8), 1, (3, 3), (2, 2))  # even kernel: p not a multiple of d


def test_gradient_against_finite_differences():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 2, 5, padding=4, dilation=2, groups=2, bias=False).double()
    fastconv.use_flipped_backward(conv)
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    # gradcheck perturbs conv.weight in place, so the module sees every perturbation.
    assert torch.autograd.gradcheck(lambda x, w: conv(x), (x, conv.weight))


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False),  # strided, not dilated
    nn.Conv2d(4, 4, 3, stride=3, padding=2, dilation=2, groups=4, bias=False),  # stride 3
    nn.Conv2d(4, 4, 3, padding=0, groups=4, bias=False),  # shrinks the map
    nn.Conv2d(4, 4, 1, groups=4, bias=False),  # 1x1
    nn.Conv2d(4, 8, 3, padding=1, bias=False),  # not depthwise
    nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=True),  # bias
    nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False, padding_mode="reflect"),
])
def test_other_convolutions_are_left_alone(conv):
    assert not fastconv.qualifies(conv)
    assert fastconv.use_flipped_backward(conv) == 0 and type(conv) is nn.Conv2d


@pytest.mark.parametrize("stride, size", [(1, (6, 5)), (1, (6, 4)), (2, (6, 5))])  # (6, 4): by phases
def test_second_derivatives_are_exact(stride, size):
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 2, 3, stride=stride, padding=2, dilation=2, groups=2, bias=False).double()
    assert fastconv.use_flipped_backward(conv) == 1
    x = torch.randn(2, 2, *size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: conv(x).pow(2), (x, conv.weight))


def test_plain_switches_it_off():
    conv = nn.Conv2d(2, 2, 5, padding=2, groups=2, bias=False)
    fastconv.use_flipped_backward(conv)
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    assert "FlippedBackwardConv" in type(conv(x).grad_fn).__name__
    with lean.plain():
        assert "Convolution" in type(conv(x).grad_fn).__name__
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: PyTorch's convolution handles the casts
        assert "Convolution" in type(conv(x).grad_fn).__name__


def test_networks_keep_their_parameter_names_and_values():
    search = SearchNetwork(C=4, num_classes=3, layers=3)
    keys = list(search.state_dict())
    n = fastconv.use_flipped_backward(search)
    # Per edge: two depthwise convolutions in sep_conv_3x3 and sep_conv_5x5, one in each dil_conv,
    # except on the reduction cells' strided edges, whose first depthwise convolutions stride.
    assert n > 0 and list(search.state_dict()) == keys
    net = build_network("cifar10", get_genotype("DARTS_V2"), 8, 5, True, 10)
    assert fastconv.use_flipped_backward(net) > 0
    x = torch.randn(2, 3, 16, 16)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 10)
