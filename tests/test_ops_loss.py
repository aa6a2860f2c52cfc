"""The language models' cross-entropy equals ``F.cross_entropy`` in value, gradient and Hessian."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dartsnas.ops import loss as loss_mod
from dartsnas.ops.loss import cross_entropy


def _case(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, vocab, generator=gen, dtype=dtype)).requires_grad_()
    return logits, torch.randint(0, vocab, (rows,), generator=gen)


@pytest.mark.parametrize("rows", [1, 7, loss_mod._ROWS, 2 * loss_mod._ROWS + 3])
def test_value_and_gradient_match_torch(rows: int) -> None:
    # Row counts around the chunk size exercise the chunked forward's first, middle and last block.
    logits, targets = _case(rows, 37, torch.float64)
    ours, ref = cross_entropy(logits, targets), F.cross_entropy(logits, targets)
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=0)
    g_ours, = torch.autograd.grad(ours, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-15)


def test_repeated_targets_accumulate() -> None:
    # Every row has the same target: the one-hot term must land once per row, not once in total.
    logits, _ = _case(20, 5, torch.float64)
    targets = torch.full((20,), 3)
    g_ours, = torch.autograd.grad(cross_entropy(logits, targets), logits)
    g_ref, = torch.autograd.grad(F.cross_entropy(logits, targets), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-15)


def test_float32_close_to_torch() -> None:
    logits, targets = _case(300, 1000, torch.float32, seed=1)
    torch.testing.assert_close(cross_entropy(logits, targets), F.cross_entropy(logits, targets))


def test_gradcheck_and_double_backward() -> None:
    # The exact Hessian-vector product of the recurrent search differentiates this loss twice.
    logits, targets = _case(11, 6, torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda z: cross_entropy(z, targets), (logits,))
    assert torch.autograd.gradgradcheck(lambda z: cross_entropy(z, targets), (logits,))
    v = torch.randn_like(logits)
    g_ours, = torch.autograd.grad(cross_entropy(logits, targets), logits, create_graph=True)
    g_ref, = torch.autograd.grad(F.cross_entropy(logits, targets), logits, create_graph=True)
    hv_ours, = torch.autograd.grad((g_ours * v).sum(), logits)
    hv_ref, = torch.autograd.grad((g_ref * v).sum(), logits)
    torch.testing.assert_close(hv_ours, hv_ref, rtol=1e-12, atol=1e-15)


def test_scaled_upstream_gradient() -> None:
    logits, targets = _case(9, 4, torch.float64, seed=3)
    g_ours, = torch.autograd.grad(2.5 * cross_entropy(logits, targets), logits)
    g_ref, = torch.autograd.grad(2.5 * F.cross_entropy(logits, targets), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-15)


def test_other_inputs_fall_back() -> None:
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    targets = torch.randint(0, 3, (2, 5))  # classes along dim 1, as F.cross_entropy reads it
    torch.testing.assert_close(cross_entropy(logits, targets), F.cross_entropy(logits, targets))
