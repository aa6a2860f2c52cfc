"""Memory-lean versions of two operations of the search cell: same values, same gradients, less kept
for the backward.

Most of the search network's memory is what autograd keeps between the forward and the backward
(about 6 GiB at the paper's batch 64). Two things in it are redundant:

- The batch norm that ends every operation of a mixed edge keeps its *input*, while the mixing
  product ``softmax(alpha)_o * o(x)`` (paper eq. 2) keeps its *output* for the alpha gradient.
  Without an affine transform the output is the normalised input ``x_hat``, from which the batch
  norm gradient follows too: ``dx = invstd * (g - mean(g) - x_hat * mean(g * x_hat))``. So
  :class:`LeanBatchNorm2d` keeps only its output (shared with the product) and the per-channel
  ``1 / std``.
- Max pooling keeps its input and an int64 argmax per output element (twice the size of the
  output in float32). :class:`LeanMaxPool2d` keeps only the input, which the cell keeps anyway, and
  finds the argmax again in the backward (one cheap pooling pass).

The pooling backward is itself differentiable. The batch norm's is not (its ``1 / std`` is kept as a
constant): a forward whose graph is differentiated twice (the exact Hessian-vector product) must run
inside :func:`plain`, which switches both back to PyTorch's operations, and a backward that builds a
graph (``create_graph=True``) through a lean batch norm raises instead of returning a wrong number.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import widebn

_state = threading.local()


def enabled() -> bool:
    """Whether lean operations are in effect in this thread (default: yes)."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def using(on: bool) -> Iterator[None]:
    """Switch lean operations on or off in this thread for the duration of the block."""
    previous = enabled()
    _state.enabled = on
    try:
        yield
    finally:
        _state.enabled = previous


def plain() -> contextlib.AbstractContextManager[None]:
    """Run lean modules as PyTorch's plain operations (for graphs that are differentiated twice)."""
    return using(False)


def builds_graph(*tensors: Tensor) -> bool:
    """Whether an operation on ``tensors`` here would record a graph that a custom backward of
    ``dartsnas.ops`` may take over (lean operations on, gradients on, some input requiring one)."""
    return enabled() and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def memory_format(t: Tensor) -> torch.memory_format:
    """Channels-last when ``t`` is stored so (and not also plainly contiguous), else contiguous."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class _BatchNormKeepOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                eps: float) -> Tensor:
        ctx.columns = widebn.columns(x)
        if ctx.columns:  # few channels, channels-last, on the CPU (ops/widebn.py)
            out, invstd = widebn.forward(x, ctx.columns, running_mean, running_var, momentum, eps)
        else:
            out, _, invstd = torch.ops.aten.native_batch_norm(x, None, None, running_mean, running_var, True,
                                                               momentum, eps)
        ctx.save_for_backward(out, invstd)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            # A graph built for a second derivative (create_graph): 1/std depends on the input in a
            # way this backward does not record. Refuse rather than return a wrong second derivative
            # (once_differentiable would not: its check never runs when only other inputs are asked).
            raise RuntimeError("a batch norm of dartsnas.ops.lean cannot be differentiated twice; build the graph "
                               "inside dartsnas.ops.lean.plain()")
        out, invstd = ctx.saved_tensors
        # A gradient in another memory format than the output (a channels-last output whose gradient
        # arrives contiguous, e.g. through a reshape of the fused cell or the network's head) sends
        # PyTorch's CPU kernel down a mixed-format path several times slower than one copy of the
        # gradient into the output's format (benchmarks/RESULTS.md, "Gradients in the output's
        # memory format").
        fmt = memory_format(out)
        if not grad.is_contiguous(memory_format=fmt):
            grad = grad.contiguous(memory_format=fmt)
        if ctx.columns:
            return widebn.backward(grad, out, invstd, ctx.columns), None, None, None, None
        # PyTorch's batch-norm backward with mean 0, invstd 1 and scale ``invstd`` on the output
        # (which is x_hat) computes exactly invstd * (g - mean(g) - x_hat * mean(g * x_hat)).
        zeros, ones = widebn.constants(invstd.numel(), invstd)
        dx, _, _ = torch.ops.aten.native_batch_norm_backward(grad, out, invstd, None, None, zeros, ones, True, 0.0,
                                                             [True, False, False])
        return dx, None, None, None, None


class LeanBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` without affine transform that keeps its output instead of its input for the
    backward. Other settings (affine, eval mode, no gradient, :func:`plain`) run the parent's code;
    parameter and buffer names are the parent's, so checkpoints do not change."""

    def forward(self, x: Tensor) -> Tensor:
        if self.affine or not self.training or not builds_graph(x) or x.dim() != 4:
            return super().forward(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as the parent computes it
                momentum = 1.0 / float(self.num_batches_tracked)
        return _BatchNormKeepOutput.apply(x, self.running_mean, self.running_var, momentum, self.eps)


class _MaxPoolRecompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel_size: int, stride: int, padding: int) -> Tensor:
        ctx.save_for_backward(x)
        ctx.args = (kernel_size, stride, padding)
        return F.max_pool2d(x, kernel_size, stride, padding)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # Differentiable as written (PyTorch's pooling backward has a derivative), so a double
        # backward through it is exact.
        (x,) = ctx.saved_tensors
        k, s, p = ctx.args
        _, indices = torch.ops.aten.max_pool2d_with_indices(x, [k, k], [s, s], [p, p])
        dx = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [k, k], [s, s], [p, p], [1, 1], False, indices)
        return dx, None, None, None


class LeanMaxPool2d(nn.MaxPool2d):
    """Square ``MaxPool2d`` that keeps only its input for the backward and finds the argmax again
    there. Other settings run the parent's code."""

    def forward(self, x: Tensor) -> Tensor:
        k, s, p = self.kernel_size, self.stride, self.padding
        simple = (isinstance(k, int) and isinstance(s, int) and isinstance(p, int) and self.dilation == 1
                  and not self.ceil_mode and not self.return_indices and x.dim() == 4)
        if not simple or not builds_graph(x):
            return super().forward(x)
        return _MaxPoolRecompute.apply(x, k, s, p)


def make_lean(module: nn.Module) -> nn.Module:
    """Swap, in place, the last batch norm (affine-free) of ``module`` or its max pooling for the
    lean version; returns ``module`` (or its replacement when it is itself one of them).

    Only the *last* batch norm is swapped: its output is what the mixing product keeps anyway,
    while an inner batch norm's output would be kept in addition to its consumer's.
    """
    if type(module) is nn.BatchNorm2d and not module.affine:
        return _convert(module, LeanBatchNorm2d)
    if type(module) is nn.MaxPool2d:
        return _convert(module, LeanMaxPool2d)
    children = list(module.named_children())
    for name, child in children:
        if type(child) is nn.MaxPool2d:
            setattr(module, name, _convert(child, LeanMaxPool2d))
    if children:
        name, last = children[-1]
        setattr(module, name, make_lean(last))
    return module


def _convert(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    # Same attributes, parameters and buffers, new forward: a class swap keeps every tensor shared.
    module.__class__ = cls
    return module
