"""Kernels cropped to the taps that can reach the input (ops/livetaps.py)."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dartsnas.ops import fastconv, livetaps


@pytest.mark.parametrize("kernel, size, stride, padding, dilation, expected", [
    ((5, 5), (2, 2), (1, 1), (4, 4), (2, 2), (2, 2)),  # dil_conv_5x5 on 2x2: the centre tap alone
    ((3, 3), (2, 2), (1, 1), (2, 2), (2, 2), (1, 1)),  # dil_conv_3x3 on 2x2: the centre tap alone
    ((5, 5), (2, 2), (1, 1), (2, 2), (1, 1), (1, 1)),  # sep_conv_5x5 on 2x2: the centre 3x3
    ((5, 5), (4, 4), (1, 1), (4, 4), (2, 2), (1, 1)),  # dil_conv_5x5 on 4x4: the centre 3x3 (dilation 2)
    ((5, 5), (4, 4), (2, 2), (4, 4), (2, 2), (1, 1)),  # ... in a reduction cell (stride 2)
    ((5, 5), (2, 2), (2, 2), (4, 4), (2, 2), (2, 2)),
    ((5, 5), (8, 8), (1, 1), (4, 4), (2, 2), (0, 0)),  # the paper's smallest map: every tap reads data
    ((3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1)),  # 1x1 maps: the centre tap alone
    ((5, 5), (2, 9), (1, 1), (4, 4), (2, 2), (2, 0)),  # each dimension on its own
    ((3, 3), (2, 2), (1, 1), (1, 1), (1, 1), (0, 0)),  # every tap of a 3x3 reaches a 2x2 map
    ((5, 5), (2, 2), (1, 1), (1, 1), (1, 1), (0, 0)),  # never more than the padding: no negative padding
])
def test_known_cuts(kernel, size, stride, padding, dilation, expected):
    assert livetaps.cut(kernel, size, stride, padding, dilation) == expected


def _configs(n: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Random convolutions on small maps, many of them with taps that only read padding."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        k, d, s, size = rng.choice([1, 2, 3, 5, 7]), rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 7)
        p = rng.randint(0, d * (k - 1))
        if (size + 2 * p - d * (k - 1) - 1) // s + 1 >= 1:
            out.append((k, d, s, p, size))
    return out


@pytest.mark.parametrize("k, d, s, p, size", _configs(40))
def test_cropped_convolution_equals_the_full_one(k, d, s, p, size):
    """Output, input gradient and weight gradient (zero on the dropped taps) equal the full kernel's,
    in float64; the crop leaves nothing more to cut."""
    torch.manual_seed(k * 100 + d * 10 + s)
    x = torch.randn(2, 3, size, size + 1, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, k, k, dtype=torch.float64, requires_grad=True)
    full = F.conv2d(x, w, None, s, p, d, 3)
    wc, pad, dil = livetaps.crop(w, x.shape[-2:], (s, s), (p, p), (d, d))
    cropped = F.conv2d(x, wc, None, s, pad, dil, 3)
    assert cropped.shape == full.shape
    torch.testing.assert_close(cropped, full, rtol=1e-13, atol=1e-13)
    g = torch.randn_like(full)
    for a, b in zip(torch.autograd.grad(cropped, (x, w), g), torch.autograd.grad(full, (x, w), g)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    assert livetaps._worth_it(tuple(wc.shape[-2:]), tuple(x.shape[-2:]), (s, s), pad, dil) == (0, 0)


def test_undilated_kernels_are_cropped_only_to_one_tap():
    """Where cropping pays (ops/livetaps.py): any dilated kernel, an undilated one only to 1x1."""
    w = torch.randn(4, 1, 5, 5)
    assert livetaps.crop(w, (2, 2), (1, 1), (2, 2), (1, 1))[0] is w  # 3x3 would be left: kept whole
    assert livetaps.crop(w, (1, 1), (1, 1), (2, 2), (1, 1))[0].shape[-2:] == (1, 1)
    assert livetaps.crop(w, (3, 3), (1, 1), (4, 4), (2, 2))[1:] == ((2, 2), (2, 2))  # dilated: 3x3 left


def test_dead_taps_are_what_is_cut():
    """Brute force on one case: the taps dropped are exactly those whose weight gradient is zero for
    every input (a perturbation of them changes no output)."""
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    w = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    base = F.conv2d(x, w, None, 1, 4, 2)
    live = set()
    for i, j in itertools.product(range(5), repeat=2):
        w2 = w.clone()
        w2[0, 0, i, j] += 1.0
        if not torch.equal(F.conv2d(x, w2, None, 1, 4, 2), base):
            live.add((i, j))
    assert live == {(2, 2)}
    assert livetaps.crop(w, (2, 2), (1, 1), (4, 4), (2, 2))[0].shape[-2:] == (1, 1)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel, dilation, stride, size", [(5, 2, 1, 2), (3, 2, 1, 2), (5, 1, 1, 2), (5, 2, 2, 4),
                                                            (5, 2, 2, 2), (5, 2, 1, 4), (3, 2, 2, 2)])
def test_flipped_backward_on_small_maps_matches_pytorch(fmt, kernel, dilation, stride, size):
    """The flipped-backward convolution of the search cells, cropped on maps smaller than its reach,
    gives PyTorch's full-kernel output and gradients (float64), and a double backward through it (the
    exact Hessian-vector product) passes gradcheck."""
    torch.manual_seed(1)
    pad = dilation * (kernel - 1) // 2
    plain = nn.Conv2d(4, 4, kernel, stride, pad, dilation, groups=4, bias=False).double()
    fast = copy.deepcopy(plain)
    assert fastconv.use_flipped_backward(fast) == 1
    x = torch.randn(3, 4, size, size, dtype=torch.float64).contiguous(memory_format=fmt)
    xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp, yf = plain(xp), fast(xf)
    torch.testing.assert_close(yf, yp, rtol=1e-13, atol=1e-13)
    g = torch.randn_like(yp)
    for a, b in zip(torch.autograd.grad(yf, [xf, fast.weight], g), torch.autograd.grad(yp, [xp, plain.weight], g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    with torch.no_grad():  # evaluation (no graph) takes the cropped kernel too
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-13, atol=1e-13)
    xs = torch.randn(1, 4, size, size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t, w: fastconv.conv2d(t, w, (stride, stride), (pad, pad),
                                                                      (dilation, dilation), 4),
                                        (xs, fast.weight.detach().clone().requires_grad_()))
