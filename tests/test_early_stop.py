"""Early stopping of the search (DARTS+ and R-DARTS) and the dominant Hessian eigenvalue in alpha."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dartsnas.search.hessian import buffers_kept, dominant_eigenvalue


class TinyMixed(nn.Module):
    """Two mixed edges (softmax over three operations each) and a linear classifier: a DARTS cell in
    miniature, small enough for an explicit Hessian in alpha."""

    def __init__(self) -> None:
        super().__init__()
        self.alphas = nn.Parameter(torch.randn(2, 3, dtype=torch.float64))
        self.w1 = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
        self.out = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += 1
        a, b = alphas.softmax(-1)
        h = a[0] * x + a[1] * torch.tanh(x) + a[2] * x @ self.w1.T
        h = b[0] * h + b[1] * torch.sigmoid(h) + b[2] * torch.tanh(h @ self.w2.T)
        return h @ self.out.T


def _tiny_problem():
    torch.manual_seed(4)
    model = TinyMixed()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    return model, x, y


def test_power_iteration_matches_the_explicit_hessian():
    model, x, y = _tiny_problem()
    explicit = torch.autograd.functional.hessian(lambda a: F.cross_entropy(model(x, a), y), model.alphas.detach())
    eigenvalues = torch.linalg.eigvalsh(explicit.reshape(6, 6))
    expected = float(eigenvalues[eigenvalues.abs().argmax()])
    got = dominant_eigenvalue(lambda: F.cross_entropy(model(x, model.alphas), y), [model.alphas], iterations=300,
                              seed=1)
    assert abs(got - expected) <= 1e-9 * abs(expected)


def test_power_iteration_is_repeatable_and_keeps_buffers():
    model, x, y = _tiny_problem()
    with buffers_kept(model):
        first = dominant_eigenvalue(lambda: F.cross_entropy(model(x, model.alphas), y), [model.alphas], seed=3)
    second = dominant_eigenvalue(lambda: F.cross_entropy(model(x, model.alphas), y), [model.alphas], seed=3)
    assert first == second
    assert float(model.seen) == 1.0  # the first call's forward was undone, the second's was not
    assert model.alphas.grad is None
