"""Batch norm of channels-last tensors with few channels, computed on a wider view of the same memory.

A channels-last tensor ``(N, C, H, W)`` is in memory a ``(N H W, C)`` matrix, and PyTorch's CPU
batch-norm kernels for it vectorise along the ``C`` channels of a row. When ``C`` is not a multiple of
the CPU's vector width (16 floats with AVX-512, 8 with AVX2) they run several times slower than for a
wider ``C``: forward and backward of 4 channels at batch 32, 32x32, take longer than those of 16
(benchmarks/RESULTS.md, "Batch norm of few channels"). The search cells with partial channels
(PC-DARTS, ``C / K`` channels per edge) and the small quickstart network are full of such batch norms.

The same memory is also a ``(N H W / r, r C)`` matrix whose column ``j`` holds channel ``j mod C``;
with ``r C`` a multiple of the vector width those kernels are fast again. Per-channel quantities are
per-column ones combined over the ``r`` columns of each channel (equal counts ``n = N H W / r``):

* statistics: ``mean = mean_k m_k`` and ``var = mean_k v_k + mean_k (m_k - mean)^2`` from the
  columns' means ``m_k`` and biased variances ``v_k`` (the exact pooled variance);
* normalisation: ``x_hat = (x - mean) / sqrt(var + eps)``, with each channel's values repeated in its
  ``r`` columns (PyTorch's eval-mode kernel);
* backward, the batch-norm gradient without affine parameters (Ioffe & Szegedy 2015, section 3):
  ``dx = invstd * (g - mean(g) - x_hat * mean(g * x_hat))``, with the column sums of ``g`` and
  ``g * x_hat`` from PyTorch's backward kernel, combined per channel.

The values are PyTorch's up to floating-point rounding (the same sums in another order).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# Bytes per vector register for the CPU capabilities whose channels-last kernels were measured.
_VECTOR_BYTES = {"AVX512": 64, "AVX2": 32}


@functools.cache
def _vector_bytes() -> int:
    return _VECTOR_BYTES.get(torch.backends.cpu.get_cpu_capability(), 0)


# Below this many elements the few extra operations of the wide path cost more than they save.
MIN_ELEMENTS = 1 << 16


def columns(x: Tensor) -> int:
    """``r`` for a channels-last CPU tensor ``x`` of at least :data:`MIN_ELEMENTS` whose channels are
    fewer than two vector widths and not a multiple of one (0 for every other tensor: PyTorch's kernels
    serve it as they are)."""
    if x.device.type != "cpu" or x.dim() != 4 or x.dtype not in (torch.float32, torch.float64):
        return 0
    if x.numel() < MIN_ELEMENTS:
        return 0
    if not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
        return 0
    lanes = _vector_bytes() // x.element_size()
    c = x.shape[1]
    if lanes == 0 or c % lanes == 0 or c >= 2 * lanes:
        return 0
    r = lanes // math.gcd(c, lanes)
    rows = x.numel() // c
    return r if rows % r == 0 and rows // r >= 2 else 0


def _wide(x: Tensor, r: int) -> Tensor:
    # (N, C, H, W) channels-last as (N H W / r, r C, 1, 1): a view of the same memory.
    return x.permute(0, 2, 3, 1).reshape(-1, r * x.shape[1], 1, 1)


def _tile(t: Tensor, r: int) -> Tensor:
    # A per-channel vector as per-column one: channel c's value in columns c, C + c, 2 C + c, ...
    return torch.cat([t] * r)


def _narrow(w: Tensor, like: Tensor) -> Tensor:
    n, c, h, wd = like.shape
    return w.view(n, h, wd, c).permute(0, 3, 1, 2)


def batch_stats(x: Tensor, r: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` over batch and space (no gradient); ``r`` is
    :func:`columns` of ``x`` when the caller has it."""
    r = columns(x) if r is None else r
    with torch.no_grad():
        # PyTorch's training-mode kernel as a statistics pass: it returns the batch mean and
        # 1 / sqrt(var + eps); with eps = 0, var = invstd^-2, except for a constant channel, whose
        # invstd it sets to 0 (the inf of invstd^-2 back to 0; a NaN stays NaN).
        _, mean, invstd = torch.ops.aten.native_batch_norm(_wide(x, r) if r else x, None, None, None, None, True,
                                                           0.0, 0.0)
        var = invstd.pow(-2).nan_to_num_(nan=math.nan, posinf=0.0)
        if r:
            m = mean.view(r, -1)
            mean = m.mean(0)
            var = var.view(r, -1).mean(0) + (m - mean).square().mean(0)
    return mean, var


def forward(x: Tensor, r: int, running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
            eps: float) -> tuple[Tensor, Tensor]:
    """Training-mode batch norm of ``x`` (``r = columns(x)``) without affine parameters: ``x_hat`` and
    ``1 / sqrt(var + eps)``, updating the running statistics as PyTorch does (unbiased variance)."""
    mean, var = batch_stats(x, r)
    with torch.no_grad():
        if running_mean is not None and running_var is not None:
            # Through ``.data``: like PyTorch's own update, it does not count as a change of the buffers
            # for autograd, which may hold them from an earlier forward (a graph differentiated twice
            # saves them) and would otherwise refuse its backward.
            n = x.numel() // x.shape[1]
            running_mean.data.copy_(momentum * mean + (1 - momentum) * running_mean)
            running_var.data.copy_(momentum * var * (n / max(n - 1, 1)) + (1 - momentum) * running_var)
        out = torch.ops.aten.native_batch_norm(_wide(x, r), None, None, _tile(mean, r), _tile(var, r), False, 0.0,
                                               eps)[0]
    return _narrow(out, x), (var + eps).rsqrt()


def backward(grad: Tensor, out: Tensor, invstd: Tensor, r: int) -> Tensor:
    """``dx`` of :func:`forward` from the output gradient ``grad`` (channels-last), its output ``out`` and
    ``invstd``."""
    c = out.shape[1]
    n = out.numel() // c
    gw, ow = _wide(grad, r), _wide(out, r)
    zeros, ones = constants(r * c, invstd)
    # Column sums of g * x_hat and of g: the weight and bias gradients of a batch norm with mean 0, 1/std 1.
    _, g_xhat, g_sum = torch.ops.aten.native_batch_norm_backward(gw, ow, None, None, None, zeros, ones, True, 0.0,
                                                                 [False, True, True])
    mean_g = g_sum.view(r, c).sum(0) / n
    mean_g_xhat = g_xhat.view(r, c).sum(0) / n
    # invstd * g - invstd * mean(g) as an eval-mode batch norm (mean 0, var 1, eps 0, scale and shift).
    dx = torch.ops.aten.native_batch_norm(gw, _tile(invstd, r), _tile(-invstd * mean_g, r), zeros, ones, False,
                                          0.0, 0.0)[0]
    dx.addcmul_(ow, _tile(invstd * mean_g_xhat, r).view(-1, 1, 1), value=-1)
    return _narrow(dx, out)


_CONSTANTS: dict[tuple[int, torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}


def constants(size: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Zeros and ones of ``size`` in ``like``'s type and device, made once per size, type and device:
    every batch-norm backward of the search needs them (here and in ops/lean.py), and they are only read."""
    key = (size, like.dtype, like.device)
    pair = _CONSTANTS.get(key)
    if pair is None:
        pair = _CONSTANTS[key] = (like.new_zeros(size), like.new_ones(size))
    return pair
