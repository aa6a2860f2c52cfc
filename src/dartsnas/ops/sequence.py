"""Matrix products that use one weight at every time step of a sequence: packed once, and
differentiated once for the whole sequence.

A recurrent cell multiplies its (B, K) states by the same (K, N) weights at each of the T time steps
(``[c, h] = s_j W``, the authors' code, rnn/model.py ``DARTSCell.cell``). At the training batch
(64 x 850 times 850 x 1,700..5,100) two things make these products run at half the CPU's rate:

- The BLAS copies the whole weight into its blocked layout at every call; with only 64 rows that
  costs about as much as the product. oneDNN can pack the weight once and reuse it for the T
  forward products, and a second packing serves the T input gradients ``g_t W^T``. The weights only
  change between training steps, so one packing per sequence is exact.
- The weight gradient ``sum_t x_t^T g_t`` is T products with an inner size of 64. Kept until the
  whole sequence has been differentiated, it is one product of the stacked (T B, K) inputs and
  (T B, N) output gradients: the same sum, at full rate.

:func:`sequence_product` returns ``x -> x @ weight`` doing both. The weight gradient reaches
``weight`` through autograd as usual (so gradient hooks and distributed reducers see it), after the
last time step's backward: every product takes a scalar "token" computed from ``weight``, and the
token's backward, which autograd runs only once all products are differentiated, returns the
stacked product. Packing needs oneDNN and float32 on the CPU; elsewhere the products are PyTorch's
and only the gradient is gathered. The backward builds no graph: a second derivative through it
raises (training never takes one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def can_pack(weight: Tensor) -> bool:
    """Whether oneDNN can pack ``weight`` for its products here (CPU, float32, oneDNN built in)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


# Fewer rows than this: PyTorch's product (a matrix-vector product for one row is bound by reading
# the weight, and packing it would cost more than it saves over a 35-step sequence).
MIN_ROWS = 2


class _Sequence:
    """The packed weights and, during the backward, the (input, output gradient) pairs of one sequence."""

    def __init__(self, weight: Tensor, pack: bool):
        self.weight = weight
        self.inputs: list[Tensor] = []
        self.grads: list[Tensor] = []
        self._pack = pack and can_pack(weight)
        self._packed: dict[bool, Tensor] = {}  # transposed? -> the packed weight

    def product(self, x: Tensor) -> Tensor:
        return self._matmul(x, transposed=False)

    def input_grad(self, g: Tensor) -> Tensor:
        return self._matmul(g, transposed=True)

    def _matmul(self, x: Tensor, transposed: bool) -> Tensor:
        """``x W``, or ``x W^T``: oneDNN's product with that matrix packed at its first use (so a
        forward without gradients packs only its own), PyTorch's for too few rows."""
        m = self.weight.detach().t() if transposed else self.weight.detach()
        if not self._pack or x.shape[0] < MIN_ROWS:
            return x @ m
        if transposed not in self._packed:
            # oneDNN's linear takes an (out, in) weight, that is m^T.
            self._packed[transposed] = torch.ops.mkldnn._reorder_linear_weight(m.t().contiguous())
        return torch.ops.mkldnn._linear_pointwise(x, self._packed[transposed], None, "none", [], "")

    def weight_grad(self) -> Tensor:
        xs, gs = self.inputs, self.grads
        self.inputs, self.grads = [], []
        if not xs:
            return torch.zeros_like(self.weight)
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
        g = torch.cat([t.reshape(-1, t.shape[-1]) for t in gs])
        return x.t() @ g


class _Token(torch.autograd.Function):
    """A scalar of ``weight`` that every product of the sequence reads; its backward hands
    ``weight`` the gathered gradient once all of them are differentiated."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, seq: _Sequence) -> Tensor:  # type: ignore[override]
        ctx.seq = seq
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.seq.weight_grad(), None


class _Product(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, token: Tensor | None, seq: _Sequence) -> Tensor:  # type: ignore[override]
        ctx.seq = seq
        ctx.save_for_backward(x)
        return seq.product(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError("a product of dartsnas.ops.sequence cannot be differentiated twice; build the model "
                               "without packed sequence weights for second derivatives")
        (x,) = ctx.saved_tensors
        seq = ctx.seq
        d_token = None
        if ctx.needs_input_grad[1]:
            seq.inputs.append(x)
            seq.grads.append(g)
            d_token = g.new_zeros(())
        return (seq.input_grad(g) if ctx.needs_input_grad[0] else None), d_token, None


def sequence_product(weight: Tensor, pack: bool = True) -> Callable[[Tensor], Tensor]:
    """``x -> x @ weight`` for the T products of one sequence (see the module's text).

    ``weight`` (K, N) must not change until the sequence has been differentiated (it does not
    within a training step). ``pack=False`` keeps PyTorch's products and only gathers the weight
    gradient into one product.
    """
    seq = _Sequence(weight, pack)
    if not torch.is_grad_enabled():
        return seq.product
    token = _Token.apply(weight, seq) if weight.requires_grad else None
    return lambda x: _Product.apply(x, token, seq)
