"""Batch norm of channels-last tensors with few channels on a wider view (ops/widebn.py): PyTorch's numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dartsnas.ops import lean, widebn

CL = torch.channels_last
wide_cpu = pytest.mark.skipif(widebn._vector_bytes() == 0,
                              reason="the wide batch norm is used on x86 CPUs with AVX2 or AVX-512 only")


@pytest.fixture(autouse=True)
def any_size(monkeypatch):
    # Small tensors here: the wide path for every size (the size threshold is tested on its own).
    monkeypatch.setattr(widebn, "MIN_ELEMENTS", 0)


def _x(shape, dtype=torch.float64, fmt=CL, seed=0):
    torch.manual_seed(seed)
    return (3 * torch.randn(*shape, dtype=dtype) + 1).contiguous(memory_format=fmt)


@wide_cpu
def test_columns_picks_a_multiple_of_the_vector_width_or_declines():
    lanes = widebn._vector_bytes() // 4  # float32
    for c in range(2, 2 * lanes):  # one channel: channels-last is also plain contiguous
        r = widebn.columns(_x((4, c, 4, 4), torch.float32))
        if c % lanes == 0:
            assert r == 0
        else:
            assert r > 1 and (r * c) % lanes == 0 and (r // 2 * c) % lanes != 0, c
    assert widebn.columns(_x((4, 2 * lanes + 4, 4, 4), torch.float32)) == 0  # wide enough already
    assert widebn.columns(_x((4, 4, 4, 4), torch.float32, torch.contiguous_format)) == 0  # not channels-last
    assert widebn.columns(_x((1, 4, 1, 1), torch.float32)) == 0  # too few rows for the columns
    assert widebn.columns(_x((4, 4, 4, 4)).to(torch.int64)) == 0


@wide_cpu
def test_small_tensors_keep_pytorchs_kernel(monkeypatch):
    monkeypatch.setattr(widebn, "MIN_ELEMENTS", 1 << 16)
    assert widebn.columns(_x((32, 4, 16, 16), torch.float32)) == 0  # 32,768 elements
    assert widebn.columns(_x((32, 4, 32, 32), torch.float32)) > 1


@wide_cpu
@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (8, 3, 4, 4), (2, 12, 5, 6)])
def test_forward_backward_and_running_statistics_equal_pytorch_in_float64(shape):
    x = _x(shape)
    assert widebn.columns(x) > 1
    rm, rv = torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    xp, xw = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp = F.batch_norm(xp, rm, rv, None, None, True, 0.1, 1e-5)
    versions = rm2._version, rv2._version
    yw = lean._BatchNormKeepOutput.apply(xw, rm2, rv2, 0.1, 1e-5)
    assert yw.is_contiguous(memory_format=CL)
    # Updated as PyTorch updates them, unseen by autograd (a graph may hold them from an earlier forward).
    assert (rm2._version, rv2._version) == versions
    torch.testing.assert_close(yw, yp, rtol=0, atol=1e-13)
    torch.testing.assert_close(rm2, rm, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(rv2, rv, rtol=1e-14, atol=1e-15)
    for g in (torch.randn_like(yp), torch.randn_like(yp).contiguous()):  # either memory format
        (dp,), (dw,) = torch.autograd.grad(yp, xp, g, retain_graph=True), torch.autograd.grad(yw, xw, g, retain_graph=True)
        assert dw.is_contiguous(memory_format=CL)
        torch.testing.assert_close(dw, dp, rtol=1e-12, atol=1e-13)


@wide_cpu
def test_gradient_against_finite_differences():
    x = _x((4, 3, 4, 4)).requires_grad_()
    assert widebn.columns(x) > 1
    assert torch.autograd.gradcheck(lambda t: lean._BatchNormKeepOutput.apply(t, None, None, 0.0, 1e-5), (x,))


@wide_cpu
def test_float32_within_rounding_and_a_constant_channel():
    x = _x((32, 4, 8, 8), torch.float32)
    x[:, 2] = 0.5  # variance 0: 1 / sqrt(0 + eps), as PyTorch
    x = x.contiguous(memory_format=CL)
    assert widebn.columns(x) > 1
    torch.testing.assert_close(lean._BatchNormKeepOutput.apply(x, None, None, 0.0, 1e-5),
                               F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5), rtol=1e-5, atol=1e-5)
    mean, var = widebn.batch_stats(x)
    torch.testing.assert_close(var, x.var(dim=(0, 2, 3), correction=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean, x.mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-6)
    assert var[2] == 0
    x[0, 1, 0, 0] = float("nan")
    mean, var = widebn.batch_stats(x)
    assert mean[1].isnan() and var[1].isnan() and not var[[0, 2, 3]].isnan().any()


def test_batch_stats_of_any_tensor_equal_var_mean():
    for fmt in (CL, torch.contiguous_format):
        for c in (3, 16, 40):
            x = _x((4, c, 5, 5), fmt=fmt)
            mean, var = widebn.batch_stats(x)
            v, m = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            torch.testing.assert_close(mean, m, rtol=1e-14, atol=1e-14)
            torch.testing.assert_close(var, v, rtol=1e-13, atol=1e-14)
