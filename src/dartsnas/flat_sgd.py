"""SGD with momentum and gradient clipping on one flat tensor instead of one tensor per weight.

A search network has hundreds of small weight tensors (the quickstart's: 889; the paper's: 1,399), and
the weight step's gradient clipping and SGD update call a few kernels per tensor: about 12,500 operator
calls and 15 ms a step on the quickstart network, more than its largest convolution. :class:`FlatSGD`
puts every weight, its gradient and its momentum buffer into three flat tensors (each parameter,
gradient and buffer stays its own tensor, a view with its own shape and memory format, aligned as an
allocation of its own would be; the gaps between them hold zeros, which neither the norm nor the
update changes), so that the clipping is two calls and the update four, whatever the number of weights.

The mathematics is :class:`torch.optim.SGD`'s (weight decay added to the gradient, momentum buffer
``m * buf + g``, the first buffer the gradient itself, ``w -= lr * buf``) and
:func:`torch.nn.utils.clip_grad_norm_`'s (the 2-norm of all gradients, coefficient
``max_norm / (norm + 1e-6)`` capped at 1). Two differences, both of the flat layout: gradients are zeroed
rather than dropped between steps (``zero_grad(set_to_none=False)``, as PyTorch did by default before
2.0 and as the authors' code does: a weight that gets no gradient still decays), and sums run in
another order (rounding). ``state_dict`` and ``load_state_dict`` are SGD's, so checkpoints are
unchanged. Whatever breaks the layout (a weight or gradient replaced by another tensor, a device
move, a loaded state) is detected before it matters: that step runs as :class:`torch.optim.SGD`, and
the layout is rebuilt after it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

# Each tensor starts at a multiple of this many elements (64 bytes in float32), as the allocator would
# place it on its own: oneDNN's convolutions are slower with weights at an arbitrary address.
ALIGN = 16


def _offsets(like: list[Tensor]) -> tuple[list[int], int]:
    """Where each of ``like`` starts in the flat tensor, and its length (gaps between them stay zero)."""
    offsets, end = [], 0
    for t in like:
        offsets.append(end)
        end += -(-t.numel() // ALIGN) * ALIGN
    return offsets, end


def _views(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Views of ``flat`` at :func:`_offsets`, with the shapes and strides of ``like`` (dense tensors)."""
    return [flat.as_strided(t.shape, t.stride(), offset) for t, offset in zip(like, _offsets(like)[0])]


class FlatSGD(torch.optim.SGD):
    """:class:`torch.optim.SGD` (one parameter group, no dampening, Nesterov or maximise) whose step and
    gradient clipping run on flat tensors (module docstring). Anything else runs as SGD."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0):
        super().__init__(params, lr, momentum=momentum, weight_decay=weight_decay)
        self._flat: tuple[Tensor, Tensor, Tensor | None] | None = None
        self._grads: list[Tensor] = []
        self._addresses: list[int] = []
        self._pack()

    # -- layout --------------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return self.param_groups[0]["params"] if len(self.param_groups) == 1 else []

    def _simple(self) -> bool:
        group = self.param_groups[0]
        return (len(self.param_groups) == 1 and not group["nesterov"] and group["dampening"] == 0
                and not group["maximize"] and not isinstance(group["lr"], Tensor))

    def _pack(self) -> None:
        """Weights, gradients and momentum buffers into flat tensors (values kept; a missing
        gradient or buffer becomes zeros and, for the buffer, is only created with the first step)."""
        params = self._params()
        self._flat = None
        if not params or not self._simple() or not all(_dense(p) for p in params):
            return
        first = params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in params):
            return
        total = _offsets(params)[1]
        with torch.no_grad():
            flat_w = first.new_zeros(total)
            flat_g = first.new_zeros(total)
            for p, view in zip(params, _views(flat_w, params)):
                view.copy_(p)
                p.data = view
            self._addresses = [p.data_ptr() for p in params]
            self._grads = _views(flat_g, params)
            for p, view in zip(params, self._grads):
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
            flat_m = None
            buffers = [self.state[p].get("momentum_buffer") for p in params] if self.state else []
            if buffers and all(b is not None for b in buffers):
                flat_m = first.new_zeros(total)
                for p, b, view in zip(params, buffers, _views(flat_m, params)):
                    view.copy_(b)
                    self.state[p]["momentum_buffer"] = view
        self._flat = (flat_w, flat_g, flat_m)

    def _intact(self, buffers: bool = False) -> bool:
        """Whether every weight and gradient (and with ``buffers`` every momentum buffer, once they
        exist) is still its view of the flat tensors. The flat tensors are held here, so no other tensor
        can sit at their addresses: an address is as good as an identity."""
        if self._flat is None or not self._simple():
            return False
        params = self._params()
        if len(params) != len(self._grads) or any(p.grad is not g for p, g in zip(params, self._grads)):
            return False
        if any(p.data_ptr() != ptr for p, ptr in zip(params, self._addresses)):
            return False
        if buffers and self._flat[2] is not None:
            state = self.state
            for p, g in zip(params, self._grads):
                b = state[p].get("momentum_buffer") if p in state else None
                # A buffer sits at its weight's offset in the flat buffers, as the gradient in the gradients'.
                if b is None or b.data_ptr() - self._flat[2].data_ptr() != g.data_ptr() - self._flat[1].data_ptr():
                    return False
        return True

    # -- the optimiser -------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients (in place: the flat layout keeps them; module docstring)."""
        if self._intact():
            self._flat[1].zero_()  # type: ignore[index]
        else:
            super().zero_grad(set_to_none)

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """:func:`torch.nn.utils.clip_grad_norm_` of the parameters' gradients; returns the total norm."""
        if not self._intact():
            return torch.nn.utils.clip_grad_norm_(self._params() or
                                                  [p for g in self.param_groups for p in g["params"]], max_norm)
        flat_g = self._flat[1]  # type: ignore[index]
        norm = torch.linalg.vector_norm(flat_g)
        flat_g.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if closure is not None or not self._intact(buffers=True):
            loss = super().step(closure)
            self._pack()
            return loss
        flat_w, flat_g, flat_m = self._flat  # type: ignore[misc]
        group = self.param_groups[0]
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        d = flat_g.add(flat_w, alpha=wd) if wd != 0 else flat_g
        if momentum != 0:
            if flat_m is None:  # the first step: the buffer is the gradient itself (torch.optim.SGD)
                flat_m = d.clone()
                params = self._params()
                for p, view in zip(params, _views(flat_m, params)):
                    self.state[p]["momentum_buffer"] = view
                self._flat = (flat_w, flat_g, flat_m)
            else:
                flat_m.mul_(momentum).add_(d)
            d = flat_m
        flat_w.add_(d, alpha=-lr)
        return None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._pack()


def _dense(t: Tensor) -> bool:
    """Whether ``t`` covers a block of memory without gaps (contiguous in some order of its dimensions)."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
