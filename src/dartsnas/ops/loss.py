"""Softmax cross-entropy over a large vocabulary, without the temporaries of the generic one.

A language model's loss reads a (tokens x vocabulary) logit matrix: 8960 x 10,000 floats (358 MB)
in the recurrent search. ``F.cross_entropy`` stores a log-softmax copy of it for the backward pass,
and its backward allocates a zero-filled matrix of the same size for the one-hot term and then a
third one for the log-softmax gradient. :func:`cross_entropy` stores nothing but the logits, and
its backward writes the gradient ``(softmax(z) - onehot(y)) / N`` straight into one fresh matrix.
The value and the gradient are the same function; the backward is written with differentiable
operations whenever a graph is being built, so the exact Hessian-vector product (double backward)
goes through it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows per chunk of the forward pass: a 512 x 10,000 block (20 MB) stays in the allocator's cache.
_ROWS = 512


class _SoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits, targets)
        total = logits.new_zeros((), dtype=torch.float64)
        for start in range(0, logits.shape[0], _ROWS):
            block = logits[start:start + _ROWS]
            picked = block.gather(1, targets[start:start + _ROWS, None]).squeeze(1)
            total += (torch.logsumexp(block, 1) - picked).sum(dtype=total.dtype)
        return (total / logits.shape[0]).to(logits.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        logits, targets = ctx.saved_tensors
        scale = grad / logits.shape[0]
        probs = torch.softmax(logits, 1)
        if torch.is_grad_enabled():
            # Building a graph (double backward): out of place, so softmax keeps its output.
            onehot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
            return (probs - onehot) * scale, None
        rows = torch.arange(logits.shape[0], device=logits.device)
        probs.mul_(scale).index_put_((rows, targets), -scale, accumulate=True)
        return probs, None


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean softmax cross-entropy of ``logits`` (N, V) against class ids ``targets`` (N,).

    Equal to ``F.cross_entropy(logits, targets)`` (no weights, no ignored index), with half its
    memory traffic; falls back to it for inputs it does not cover (e.g. half precision on a GPU).
    """
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.float64):
        return F.cross_entropy(logits, targets)
    return _SoftmaxCrossEntropy.apply(logits, targets)
