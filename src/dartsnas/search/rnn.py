"""The recurrent search model (paper sections 2.1 and 3.1.2; the authors' code, rnn/model_search.py).

Every intermediate node mixes all its predecessors and all activations: node ``i`` (1..8) sums,
over predecessors ``j < i`` and operations ``k`` other than ``none``,
``softmax(alpha_e)[k] * (s_j + sigmoid(c_ij) * (f_k(h_ij) - s_j))`` with ``[c_ij, h_ij] = s_j W_i``,
followed by a BatchNorm without affine parameters (it keeps the node states on one scale while the
mixing weights move; the authors' search cell does the same). ``none`` contributes zero. The 36
edges x 5 operations of ``alphas`` are an ``nn.Parameter``, so they are saved and resumed with
the rest of the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..genotype import RNN_PRIMITIVES, RecurrentGenotype, derive_rnn_cell
from ..models.rnn import ACTIVATIONS, DARTSCell, RNNModel
from ..ops.compiled import Kernel
from ..settings.choices import RNN_STEPS as STEPS  # the cell size lives with the settings


def _derivative(name: str, h: Tensor, act: Tensor) -> Tensor:
    """f'(h) for each activation, from h and f(h); written with differentiable ops (double backward)."""
    if name == "tanh":
        return 1.0 - act * act
    if name == "sigmoid":
        return act * (1.0 - act)
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "identity":
        return torch.ones_like(h)
    raise ValueError(f"unknown activation {name!r}")


class MixedNode(torch.autograd.Function):
    """One search-cell node: ``sum_e sum_k p_ek (s_e + sigmoid(c_e) (f_k(h_e) - s_e))``.

    With ``P_e = sum_k p_ek`` this is ``sum_e P_e s_e (1 - c_e) + c_e sum_k p_ek f_k(h_e)``. Plain
    autograd would keep about a dozen (edges, B, H) intermediates per node and time step; this
    function keeps only its inputs and recomputes the activations in the backward pass, which cuts
    the search's memory by more than half. The activations are written into one (E, K, B*H) block,
    so that the mixture is one batched product and the K mixing-weight gradients one reduction. When a graph of the backward is needed (the exact
    Hessian-vector product's double backward), the backward is written with differentiable
    operations instead.

    Inputs: ``st`` (E, B, H) predecessor states, ``ch`` (E, B, 2H) their ``[c, h]`` pre-activations,
    ``p`` (E, K) mixing weights of the K activations ``ops`` (``none`` excluded: it adds zero).
    With ``compiled``, the forward and the (first-order) backward are the plain formulas compiled
    into fused loops by ``torch.compile`` (:mod:`dartsnas.ops.compiled`).
    """

    @staticmethod
    def forward(ctx: Any, st: Tensor, ch: Tensor, p: Tensor, ops: tuple[str, ...],  # type: ignore[override]
                compiled: bool = False) -> Tensor:
        ctx.ops = ops
        ctx.compiled = compiled
        ctx.save_for_backward(st, ch, p)
        if compiled:
            return _FORWARD(*_kernel_inputs(st, ch, p), ops)
        c_pre, h = ch.chunk(2, dim=-1)
        c = torch.sigmoid(c_pre)
        mix = _mix_batched(_activations(h, ops), p).view_as(st)
        total = p.sum(1).view(-1, 1, 1)
        # keep + c (mix - keep) with keep = P s, summed over the incoming edges.
        mix.addcmul_(st, -total).mul_(c).addcmul_(st, total)
        return mix.sum(0)

    @staticmethod
    def backward(ctx: Any, ds: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        st, ch, p = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*_backward_differentiable(st, ch, p, ctx.ops, ds), None, None)
        if ctx.compiled:
            return (*_BACKWARD(*_kernel_inputs(st, ch, p), ctx.ops, ds), None, None)
        return (*_backward_fast(st, ch, p, ctx.ops, ds), None, None)


def _kernel_inputs(st: Tensor, ch: Tensor, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The inputs of a compiled kernel, as tensors that differ only in their sizes from node to node:
    a compiled graph guards on ``requires_grad`` and on storage offsets, and ``p`` is a slice of the
    cell's mixing weights at a different offset for every node (one recompilation each otherwise)."""
    return st.detach(), ch.detach(), p.detach().clone()


def _activations(h: Tensor, ops: tuple[str, ...]) -> Tensor:
    """``f_k(h)`` for every operation, as one contiguous (E, K, B*H) block."""
    E = h.shape[0]
    acts = h.new_empty(E, len(ops), *h.shape[1:])
    for k, name in enumerate(ops):
        out = acts[:, k]
        if name == "tanh":
            # tanh(x) = 2 sigmoid(2x) - 1: the same function within float rounding (absolute
            # error ~1e-7 in float32), and several times faster than torch.tanh on the CPU, whose
            # kernel is neither vectorised as well nor multi-threaded for these sizes.
            torch.sigmoid(h * 2.0, out=out).mul_(2.0).sub_(1.0)
        elif name == "sigmoid":
            torch.sigmoid(h, out=out)
        elif name == "relu":
            torch.clamp_min(h, 0.0, out=out)
        elif name == "identity":
            out.copy_(h)
        else:
            raise ValueError(f"unknown activation {name!r}")
    return acts.view(E, len(ops), -1)


def _mix_batched(acts: Tensor, p: Tensor) -> Tensor:
    """``sum_k p_ek f_k`` for each edge: (E, 1, K) x (E, K, B*H) -> (E, B*H)."""
    return torch.bmm(p.unsqueeze(1), acts).squeeze(1)


def _mix(h: Tensor, p: Tensor, ops: tuple[str, ...]) -> tuple[Tensor, list[Tensor]]:
    """``sum_k p_ek f_k(h_e)`` and the activations, in plain differentiable operations."""
    acts = [ACTIVATIONS[name](h) for name in ops]
    mix = None
    for k, act in enumerate(acts):
        term = p[:, k].view(-1, 1, 1) * act
        mix = term if mix is None else mix + term
    assert mix is not None
    return mix, acts


def _node_plain(st: Tensor, ch: Tensor, p: Tensor, ops: tuple[str, ...]) -> Tensor:
    """The node in plain differentiable operations: the reference of :class:`MixedNode`."""
    c_pre, h = ch.chunk(2, dim=-1)
    c = torch.sigmoid(c_pre)
    mix = _mix(h, p, ops)[0]
    return (p.sum(1).view(-1, 1, 1) * st * (1.0 - c) + c * mix).sum(0)


def _backward_differentiable(st: Tensor, ch: Tensor, p: Tensor, ops: tuple[str, ...], ds: Tensor
                             ) -> tuple[Tensor, Tensor, Tensor]:
    c_pre, h = ch.chunk(2, dim=-1)
    c = torch.sigmoid(c_pre)
    mix, acts = _mix(h, p, ops)
    g = ds.unsqueeze(0)
    total = p.sum(1).view(-1, 1, 1)
    one_minus_c = 1.0 - c
    d_st = g * total * one_minus_c
    d_c = g * (mix - total * st) * c * one_minus_c
    slope = None
    for k, (name, act) in enumerate(zip(ops, acts)):
        term = p[:, k].view(-1, 1, 1) * _derivative(name, h, act)
        slope = term if slope is None else slope + term
    assert slope is not None
    d_h = g * c * slope
    base = (g * st * one_minus_c).sum((1, 2))
    d_p = torch.stack([(g * c * act).sum((1, 2)) for act in acts], dim=1) + base.unsqueeze(1)
    return d_st, torch.cat([d_c, d_h], dim=-1), d_p


def _backward_fast(st: Tensor, ch: Tensor, p: Tensor, ops: tuple[str, ...], ds: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
    E = st.shape[0]
    c_pre, h = ch.chunk(2, dim=-1)
    c = torch.sigmoid(c_pre)
    acts = _activations(h, ops)
    total = p.sum(1).view(-1, 1, 1)
    gc = c * ds  # dL/d(mix - keep), per edge
    one_minus_c = torch.sub(1.0, c)
    g_keep = one_minus_c * ds  # dL/d(P s), per edge
    # dL/dp_ek = <g c, f_k> + <g (1 - c), s>; a product and a sum, which beat a batched
    # matrix-vector product for these shapes.
    base = (g_keep * st).view(E, 1, -1).sum(-1)
    d_p = (acts * gc.view(E, 1, -1)).sum(-1) + base
    d_st = g_keep.mul_(total)
    d_ch = torch.empty_like(ch)
    d_c, d_h = d_ch.chunk(2, dim=-1)
    # dL/dc_pre = g (mix - P s) c (1 - c)
    mix = _mix_batched(acts, p).view_as(st)
    mix.addcmul_(st, -total)
    torch.mul(gc, one_minus_c, out=d_c)
    d_c.mul_(mix)
    # dL/dh = g c sum_k p_ek f_k'(h), each derivative read off f_k(h): tanh' = 1 - t^2,
    # sigmoid' = s - s^2, relu' = sign(relu(h)), identity' = 1 (its constant joins tanh's).
    constant = sum((p[:, k] for k, name in enumerate(ops) if name in ("tanh", "identity")),
                   torch.zeros_like(p[:, 0]))
    slope = constant.view(-1, 1, 1).expand_as(st).clone()
    for k, name in enumerate(ops):
        act = acts[:, k].view_as(st)
        pk = p[:, k].view(-1, 1, 1)
        if name == "tanh":
            slope.addcmul_(act * -pk, act)
        elif name == "sigmoid":
            slope.addcmul_(torch.addcmul(act, act, act, value=-1.0), pk)
        elif name == "relu":
            slope.addcmul_(torch.sign(act), pk)
    torch.mul(gc, slope, out=d_h)
    return d_st, d_ch, d_p


# Compiled on first use by cells built with ``compile=True``; the plain formulas fuse into a few loops.
_FORWARD = Kernel(_node_plain, "the search cell's node forward")
_BACKWARD = Kernel(_backward_differentiable, "the search cell's node backward")


class SearchCell(DARTSCell):
    """The mixed recurrent cell; ``probs`` (edges x operations) is passed in by the model."""

    def __init__(self, ninp: int, nhid: int, dropouth: float, dropoutx: float, steps: int = STEPS,
                 primitives: tuple[str, ...] = RNN_PRIMITIVES, fused: bool = True, compile: bool = False):
        super().__init__(ninp, nhid, dropouth, dropoutx, genotype=None, steps=steps)
        self.primitives = primitives
        self.fused = fused  # False: the same mixture in plain autograd operations (reference for tests)
        self.compile = compile  # fused node kernels through torch.compile
        self.bn = nn.BatchNorm1d(nhid, affine=False)
        self._op_index = [k for k, name in enumerate(primitives) if name != "none"]
        self._op_names = tuple(primitives[k] for k in self._op_index)

    def _prepare(self, probs: Tensor) -> Tensor:  # type: ignore[override]
        # Mixing weights of the activations only; ``none`` contributes zero to every node.
        return probs[:, self._op_index]

    def _nodes(self, s0: Tensor, h_mask: Tensor | None, probs: Tensor) -> Tensor:  # type: ignore[override]
        H = self.nhid
        B = s0.shape[0]
        states = [self.bn(s0)]
        offset = 0
        for i in range(self.steps):
            n = i + 1  # node i+1 reads nodes 0..i
            st = torch.stack(states)  # (n, B, H)
            inp = st if h_mask is None else st * h_mask
            ch = (inp.view(n * B, H) @ self._Ws[i]).view(n, B, 2 * H)
            p = probs[offset:offset + n]
            if self.fused:
                s = MixedNode.apply(st, ch, p, self._op_names, self.compile)
            else:
                s = _node_plain(st, ch, p, self._op_names)
            # BatchNorm without affine parameters on every node state (paper section 3.1.2, against exploding
            # gradients during search; the authors' code, rnn/model_search.py ``DARTSCellSearch``).
            states.append(self.bn(s))
            offset += n
        return torch.stack(states[1:]).mean(0)


class RNNSearchModel(RNNModel):
    """:class:`RNNModel` around a :class:`SearchCell`, owning the architecture parameters."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nhidlast: int | None = None, dropout: float = 0.75,
                 dropouth: float = 0.25, dropoutx: float = 0.75, dropouti: float = 0.2, dropoute: float = 0.0,
                 steps: int = STEPS, primitives: tuple[str, ...] = RNN_PRIMITIVES, compile: bool = False):
        cell = SearchCell(ninp, nhid, dropouth, dropoutx, steps=steps, primitives=primitives, compile=compile)
        super().__init__(ntoken, ninp, nhid, nhidlast, dropout, dropouth, dropoutx, dropouti, dropoute, cell=cell)
        self.steps = steps
        self.primitives = tuple(primitives)
        n_edges = steps * (steps + 1) // 2
        # Small random alphas so that no operation starts ahead (1e-3 * N(0, 1), as for the CNN search; the
        # authors' code, rnn/model_search.py ``_initialize_arch_parameters``).
        self.alphas = nn.Parameter(1e-3 * torch.randn(n_edges, len(primitives)))

    def _cell_kwargs(self) -> dict[str, Tensor]:
        return {"probs": F.softmax(self.alphas, dim=-1)}

    def genotype(self) -> RecurrentGenotype:
        """One strongest predecessor per node and its best non-``none`` activation (paper section 2.4)."""
        weights = F.softmax(self.alphas.detach().double(), dim=-1).tolist()
        gene = derive_rnn_cell(weights, self.primitives, self.steps)
        return RecurrentGenotype(recurrent=gene, concat=range(1, self.steps + 1))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas]

    def named_weight_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if n != "alphas")

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_weight_parameters()]

    def arch_weights(self) -> dict[str, list[list[float]]]:
        """Softmaxed alphas, one row per edge (the run directory's ``alphas/epoch_XXX.json``)."""
        return {"recurrent": F.softmax(self.alphas.detach().float(), dim=-1).cpu().tolist()}
