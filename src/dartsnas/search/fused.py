"""The search cell computed state by state, with the work of all edges leaving a state done together.

Paper section 2.2: every edge ``(i, j)`` of the cell is a mixed operation ``sum_o softmax(alpha)_o o(x_j)``
on its source state ``x_j``, and node ``i`` sums its incoming edges. Edge by edge, that is about a
hundred small kernels per edge. All edges leaving state ``j`` see the same input and have the same
stride, so once ``x_j`` exists:

* parameter-free operations are computed once for the state, not once per edge: the skip connection,
  and each pooling with its affine-free batch norm (whose batch statistics are the same for every edge;
  each edge's running statistics are still updated from them, so checkpoints and eval mode are exact);
* the convolutions of one operation type on all ``n`` edges are one grouped convolution over the
  ``n``-fold repeated input (``n`` groups of the edge's own groups), with the edges' weights
  concatenated in the forward, and one batch norm over the ``n * C`` channels (per-channel statistics:
  exact), so the parameters, buffers and their names stay the edges' own;
* each operation's ``n`` outputs are weighted and added into the ``n`` destination nodes by one
  ``addcmul`` on a ``(batch, n, C, H, W)`` accumulator of those nodes.

The values are those of :meth:`SearchCell.forward` edge by edge up to the order of floating-point
sums. PC-DARTS's partial channels (Xu et al. 2020, eq. 3) fuse too: every edge leaving a state takes
the same first ``C / K`` channels; since the channel shuffle is a fixed permutation, the weighted sum of
shuffled edge outputs is the shuffle of the weighted sums, taken once per node. Cells whose modules have
been replaced by other kinds (``SyncBatchNorm``) are computed edge by edge (:func:`fusable`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import fastconv, lean, widebn
from ..ops.cnn import Conv7x1_1x7, DilConv, FactorizedReduce, ReLUConvBN, SepConv, pointwise_stride2
from ..ops.fastconv import FlippedBackwardConv2d
from . import robust

Coef = Tensor | float | None


@functools.cache
def edge_order(steps: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The cell's edge indices grouped by source state, and the number leaving each state 0..steps.

    Node ``i`` has edges ``offset(i) + j`` from states ``j = 0 .. i + 1``, so state ``j`` feeds nodes
    ``max(0, j - 1) .. steps - 1``: a contiguous run of nodes, in that order here.
    """
    order, sizes = [], []
    for j in range(steps + 1):
        nodes = range(max(0, j - 1), steps)
        order += [2 * i + i * (i - 1) // 2 + j for i in nodes]
        sizes.append(len(nodes))
    return tuple(order), tuple(sizes)


# The module kinds the search operations are built from (ops/cnn.py OPS, ops/lean.py, ops/fastconv.py).
_KNOWN = frozenset({nn.ModuleList, nn.Sequential, nn.ReLU, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.BatchNorm2d,
                    nn.Conv2d, lean.LeanBatchNorm2d, lean.LeanMaxPool2d, FlippedBackwardConv2d, SepConv, DilConv,
                    FactorizedReduce, ReLUConvBN, Conv7x1_1x7})


_FUSED_BN = (nn.BatchNorm2d, lean.LeanBatchNorm2d)
_FUSED_CONV = (nn.Conv2d, FlippedBackwardConv2d)


def fusable(cell: nn.Module) -> bool:
    """Whether every batch norm and convolution of the cell's edges is one :func:`cell_forward` can
    fuse (plain or lean, affine-free batch norms with running statistics and a momentum; plain or
    flipped-backward, bias-free convolutions), and every module one of the operations' own kinds (an
    operation replaced by anything else, e.g. by hand, is computed edge by edge)."""
    return cell_plan(cell) is not None


def _walk_fusable(cell: nn.Module) -> bool:
    # Batch norms and convolutions of other classes are not _KNOWN; their settings are _Plan.valid's.
    stack: list[nn.Module] = [cell.edges]
    while stack:  # every module below the edges
        m = stack.pop()
        stack.extend(c for c in m._modules.values() if c is not None)
        if type(m) not in _KNOWN and type(m).__name__ != "MixedOp":
            return False
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            return False
    return True


# Module trees change rarely (a batch norm replaced by a synchronised one, an operation by hand), and only
# through registration (setattr, add_module, register_parameter), which PyTorch reports to global hooks:
# the cell's plan below is kept until then. functional_call's substitution of tensors registers nothing.
_generation = 0


def _structure_changed(*_: object) -> None:
    global _generation
    _generation += 1


nn.modules.module.register_module_module_registration_hook(_structure_changed)
nn.modules.module.register_module_parameter_registration_hook(_structure_changed)

_Group = tuple  # one operation of the n edges leaving a state, as modules (see _plan_group)


class _Plan:
    """A cell's modules arranged for :func:`cell_forward`: per source state, its edges and each
    operation's modules across them; and every batch norm and convolution of the edges, whose settings
    that can change without a registration (momentum, padding mode, ...) are checked at each forward."""

    def __init__(self, cell: nn.Module):
        order, sizes = edge_order(cell.steps)
        self.states: list[tuple[list[nn.Module], list[tuple[int, _Group]], _Group | None]] = []
        start = 0
        for n in sizes:
            edges = [cell.edges[e] for e in order[start:start + n]]
            start += n
            first = edges[0]
            ops = [(o, _plan_group([e.ops[pos] for e in edges])) for pos, o in enumerate(first.op_index)]
            aux = _plan_group([e.aux for e in edges]) if first.aux is not None else None
            self.states.append((edges, ops, aux))
        self.spans: dict[object, tuple[tuple[Tensor, ...], Tensor]] = {}  # see _cached_span
        modules = list(cell.edges.modules())
        self.bns = [m for m in modules if isinstance(m, nn.modules.batchnorm._NormBase)]
        self.convs = [m for m in modules if isinstance(m, nn.Conv2d)]

    def valid(self) -> bool:
        # Also the classes: a class swapped in place (as ops/lean.py and ops/fastconv.py do) registers nothing.
        return not any(type(m) not in _FUSED_BN or m.affine or not m.track_running_stats or m.momentum is None
                       for m in self.bns) and all(type(m) in _FUSED_CONV and m.padding_mode == "zeros"
                                                  for m in self.convs)


def _plan_group(ops: list[nn.Module]) -> _Group:
    """``("skip",)``, ``("pool", pooling, batch norms)``, ``("reduce", conv_1s, conv_2s, batch norms)`` (a
    factorized reduce) or ``("layers", [(kind, modules)], n)`` for a ReLU-first sequence: its layers after
    the ReLU as ``relu``, ``conv`` or ``bn`` with the n edges' modules."""
    op = ops[0]
    if isinstance(op, nn.Identity):
        return ("skip",)
    if isinstance(op, nn.Sequential) and isinstance(op[0], (nn.MaxPool2d, nn.AvgPool2d)):
        return ("pool", op[0], [o[1] for o in ops])
    if isinstance(op, FactorizedReduce):
        return ("reduce", [o.conv_1 for o in ops], [o.conv_2 for o in ops], [o.bn for o in ops])
    layers = [list(o.op) for o in ops]
    steps: list[tuple[str, list[nn.Module]]] = []
    for k in range(1, len(layers[0])):
        layer = layers[0][k]
        column = [seq[k] for seq in layers]
        if isinstance(layer, nn.ReLU):
            steps.append(("relu", column))
        elif isinstance(layer, nn.Conv2d):
            steps.append(("conv", column))
        elif isinstance(layer, nn.BatchNorm2d):
            steps.append(("bn", column))
        else:
            raise TypeError(f"cannot fuse {type(layer).__name__}")
    return ("layers", steps, len(ops))


def cell_plan(cell: nn.Module) -> _Plan | None:
    """The cell's plan for :func:`cell_forward`, made again after any change of a module tree; None when
    the cell cannot be fused (:func:`fusable`)."""
    cached = cell.__dict__.get("_fused_plan")
    if cached is None or cached[0] != _generation:
        plan = _Plan(cell) if _walk_fusable(cell) else None
        cached = (_generation, plan)
        cell.__dict__["_fused_plan"] = cached
    plan = cached[1]
    return plan if plan is not None and plan.valid() else None


def _conv(convs: list[nn.Conv2d], x: Tensor, shift: int = 0) -> Tensor:
    """The ``n`` edges' convolutions as one, on ``x`` holding the edges' inputs one after the other
    (for the factorized reduce's 1x1 stride-2 ones, on ``x[:, :, shift:, shift:]``)."""
    c = convs[0]
    weight = torch.cat([m.weight for m in convs]) if len(convs) > 1 else c.weight
    groups = c.groups * len(convs)
    if c.kernel_size == (1, 1) and c.stride == (2, 2):  # the factorized reduce's (ops/cnn.py)
        return pointwise_stride2(x, weight, groups, shift)
    return fastconv.conv2d(x, weight, c.stride, c.padding, c.dilation, groups,
                           flipped=isinstance(c, FlippedBackwardConv2d))


def _span(tensors: list[Tensor]) -> Tensor | None:
    """The 1-D view over ``tensors`` when they lie one after another in one storage (as :func:`_pack`
    puts the edges' batch-norm buffers), else None."""
    first = tensors[0]
    storage, start, size = first.untyped_storage().data_ptr(), first.data_ptr(), first.element_size()
    total = 0
    for t in tensors:
        if t.data_ptr() != start + total * size or t.untyped_storage().data_ptr() != storage or not t.is_contiguous():
            return None
        total += t.numel()
    return first.as_strided((total,), (1,))


def _cached_span(cache: dict[object, tuple[tuple[Tensor, ...], Tensor]], key: object, tensors: list[Tensor]
                 ) -> Tensor | None:
    """:func:`_span` of ``tensors``, remembered under ``key`` for as long as they are the same tensor
    objects (a buffer moved or replaced is a new object; packing assigns new views)."""
    hit = cache.get(key)
    if hit is not None and len(hit[0]) == len(tensors) and all(a is b for a, b in zip(hit[0], tensors)):
        return hit[1]
    span = _span(tensors)
    if span is not None:
        cache[key] = (tuple(tensors), span)
    return span


def _pack(bns: list[nn.Module]) -> None:
    """Put the running statistics and counters of ``bns`` one after another into one tensor per kind
    (in this order: a fused batch norm's edges are then one slice of it). Each module keeps its own
    buffers, now views: names, values, state_dict and checkpoints are unchanged."""
    with torch.no_grad():
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            buffers = [getattr(m, name) for m in bns]
            flat = torch.cat([b.reshape(-1) for b in buffers])
            for m, b, view in zip(bns, buffers, flat.split([b.numel() for b in buffers])):
                setattr(m, name, view.view_as(b))


class _Bookkeeping:
    """The edges' batch-norm bookkeeping of one cell forward, applied at its end in a few calls for the
    whole cell instead of a few per batch norm: ``num_batches_tracked + 1``, and the running statistics
    ``(1 - momentum) * running + momentum * batch statistic`` (unbiased variance), each edge's as its
    own batch norm would update them.

    The cell's batch norms are packed (:func:`_pack`) in the order of its first forward, after which
    each fused batch norm's running statistics are one slice that it updates in place, and every
    counter of the cell is one tensor; buffers moved apart since (another device, a replaced tensor)
    take the general path, and are packed again at the end of that forward."""

    def __init__(self, spans: dict[object, tuple[tuple[Tensor, ...], Tensor]]) -> None:
        self.spans = spans  # the cell plan's cache of packed views (_cached_span)
        self.counters: list[Tensor] = []
        self.copies: dict[int, tuple[list[Tensor], list[Tensor]]] = {}  # per size: buffers, their new values
        self.lerps: dict[float, tuple[list[Tensor], list[Tensor]]] = {}  # per momentum: buffers, statistics
        self.span_lerps: list[tuple[Tensor, Tensor, float]] = []  # packed (n, C) buffers, statistic, momentum
        self.groups: list[list[nn.Module]] = []
        self.packed = True

    def running(self, bns: list[nn.Module], means: list[Tensor], variances: list[Tensor]
                ) -> tuple[Tensor, Tensor] | None:
        """The running mean and variance of the edges ``bns`` (their buffers ``means`` and
        ``variances``) as one slice each of the packed buffers, or None."""
        self.groups.append(bns)
        if len(bns) == 1:
            return means[0], variances[0]
        mean = _cached_span(self.spans, ("mean", id(bns)), means)
        variance = _cached_span(self.spans, ("var", id(bns)), variances) if mean is not None else None
        if variance is None:
            self.packed = False
            return None
        return mean, variance  # type: ignore[return-value]

    def copy(self, buffers: list[Tensor], values: Tensor) -> None:
        """``values`` holds the new values of ``buffers`` one after the other."""
        dst, src = self.copies.setdefault(buffers[0].numel(), ([], []))
        dst += buffers
        src.append(values)

    def lerp(self, buffers: list[Tensor], statistic: Tensor, momentum: float, packed: Tensor | None = None) -> None:
        # Under autocast the statistic may be in a lower precision than the (float32) running buffers.
        if statistic.dtype != buffers[0].dtype:
            statistic = statistic.to(buffers[0].dtype)
        if packed is not None:
            self.span_lerps.append((packed.view(len(buffers), -1), statistic, momentum))
            return
        dst, src = self.lerps.setdefault(momentum, ([], []))
        dst += buffers
        src += [statistic] * len(buffers)

    def apply(self) -> None:
        # Every write goes through ``.data``, like PyTorch's own update of running statistics: packed
        # buffers share one version counter, and slices of them that other batch norms saved for their
        # backward must not count as changed.
        counters = _cached_span(self.spans, "counters", self.counters) if self.counters else None
        with torch.no_grad():
            if counters is not None:
                counters.data.add_(1)
            elif self.counters:
                torch._foreach_add_([c.data for c in self.counters], 1)
            for size, (dst, src) in self.copies.items():
                torch._foreach_copy_([d.data for d in dst], torch.cat(src).view(-1, size).unbind(0))
            for momentum, (dst, src) in self.lerps.items():
                torch._foreach_lerp_([d.data for d in dst], src, momentum)
            for buffers, statistic, momentum in self.span_lerps:
                buffers.data.lerp_(statistic, momentum)  # the statistic broadcast over the edges
        if not self.packed or (self.counters and counters is None):
            _pack([m for group in self.groups for m in group])


def _batch_norm(bns: list[nn.BatchNorm2d], x: Tensor, book: _Bookkeeping) -> Tensor:
    """The affine-free batch norms of the ``n`` edges over ``x``: their ``n * C`` channels one after the
    other, or ``C`` channels common to all edges (then one normalisation: the batch statistics are the
    edges' common ones). Their bookkeeping goes to ``book``. In eval mode each edge normalises with its
    own running statistics, also on common channels (then the result holds the ``n`` edges' ``C``
    channels one after the other)."""
    b, n = bns[0], len(bns)
    shared = x.shape[1] == b.num_features and n > 1
    means = [m.running_mean for m in bns]
    variances = [m.running_var for m in bns]
    packed = book.running(bns, means, variances)  # type: ignore[arg-type]
    if not b.training:
        x = _repeat(x, n) if shared else x
        stats = packed if packed is not None else (torch.cat(means), torch.cat(variances))  # type: ignore[arg-type]
        return F.batch_norm(x, *stats, None, None, False, 0.0, b.eps)
    book.counters += [m.num_batches_tracked for m in bns]  # type: ignore[misc]
    if shared:
        # Running statistics with momentum 1 are the batch's own (the mean and the unbiased variance,
        # exactly): the one normalisation computes them, and each edge's buffers follow at the end.
        running: tuple[Tensor | None, Tensor | None] = (means[0].new_zeros(b.num_features),  # type: ignore
                                                        variances[0].new_zeros(b.num_features))  # type: ignore
        book.lerp(means, running[0], b.momentum, packed[0] if packed else None)  # type: ignore[arg-type]
        book.lerp(variances, running[1], b.momentum, packed[1] if packed else None)  # type: ignore[arg-type]
    elif packed is not None:
        running = packed  # one slice of the cell's buffers, updated in place by the normalisation
    else:
        # The batch norm updates the concatenation in place, which is then copied back edge by edge.
        running = torch.cat(means), torch.cat(variances)  # type: ignore[arg-type]
        book.copy(means, running[0])  # type: ignore[arg-type]
        book.copy(variances, running[1])  # type: ignore[arg-type]
    momentum = 1.0 if shared else b.momentum
    # An inner batch norm of few channels (ops/widebn.py) takes the same path as the lean ones: it keeps
    # its output instead of its input, the same size, and PyTorch's backward is slow for it.
    if (isinstance(b, lean.LeanBatchNorm2d) or widebn.columns(x)) and lean.builds_graph(x):
        return lean._BatchNormKeepOutput.apply(x, *running, momentum, b.eps)
    return F.batch_norm(x, *running, None, None, True, momentum, b.eps)


def _shared_pool(pool: nn.Module, bns: list[nn.BatchNorm2d], x: Tensor, book: _Bookkeeping) -> Tensor:
    """Pooling followed by an affine-free batch norm, the same on every edge: computed once, shape
    ``(batch, 1, C, H, W)`` in training; ``(batch, n, C, H, W)`` in eval mode (each edge's own running
    statistics)."""
    y = _batch_norm(bns, pool(x), book)
    return y.unflatten(1, (-1, x.shape[1]))


def _relu_op(group: _Group, x: Tensor, book: _Bookkeeping) -> Tensor:
    """The ``n`` edges' ReLU-first operation (its ReLU already applied: ``x`` is the repeated ``relu``
    of the input), shape ``(batch, n, C, H, W)``; ``group`` from :func:`_plan_group`."""
    if group[0] == "reduce":
        _, conv_1, conv_2, bns = group
        n = len(bns)
        a = _conv(conv_1, x)
        b = _conv(conv_2, x, shift=1)
        if b.shape[-2:] != a.shape[-2:]:
            b = F.pad(b, (0, a.shape[-1] - b.shape[-1], 0, a.shape[-2] - b.shape[-2]))
        # Each edge's output channels are its conv_1's then its conv_2's.
        y = torch.cat([a.unflatten(1, (n, -1)), b.unflatten(1, (n, -1))], dim=2).flatten(1, 2)
        return _batch_norm(bns, y, book).unflatten(1, (n, -1))
    _, steps, n = group
    y = x
    for kind, modules in steps:
        if kind == "relu":
            y = F.relu(y)
        elif kind == "conv":
            y = _conv(modules, y)
        else:
            y = _batch_norm(modules, y, book)
    return y.unflatten(1, (n, -1))


def _repeat(x: Tensor, n: int) -> Tensor:
    # The edges' common input, once per edge along the channels (a grouped convolution's groups).
    return x if n == 1 else torch.cat([x] * n, dim=1)


def _add(acc: Tensor | None, y: Tensor, c: Coef, n: int) -> Tensor:
    """``acc + c * y`` for ``y`` of shape ``(batch, n or 1, C, H, W)`` and ``c`` one coefficient per
    edge (``(n, 1, 1, 1)``), a number or None (1)."""
    if acc is None:
        out = y if c is None else y * c
        return out.expand(-1, n, -1, -1, -1) if out.shape[1] != n else out
    if c is None:
        return acc + y
    if isinstance(c, float):
        return torch.add(acc, y, alpha=c)
    return torch.addcmul(acc, y, c)


def cell_forward(cell: nn.Module, plan: _Plan, s0: Tensor, s1: Tensor, weights: Tensor, edge_weights: Tensor | None,
                 aux_coef: float) -> Tensor:
    """:meth:`SearchCell.forward` computed state by state (module docstring), with the cell's
    :func:`cell_plan`."""
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    fmt = lean.memory_format(states[1])
    k = plan.states[0][0][0].partial_channels
    order, sizes = edge_order(cell.steps)
    index = torch.tensor(order, device=weights.device)
    # Coefficient of operation o on edge e: its mixing weight times, with edge normalisation, the edge's
    # weight in its node's sum (PC-DARTS eq. 4); rows grouped by source state, as (n, 1, 1, 1) blocks.
    coef = weights if edge_weights is None else weights * edge_weights[:, None]
    coefs = coef.t().index_select(1, index).view(coef.shape[1], -1, 1, 1, 1).split(sizes, dim=1)
    if edge_weights is None:
        node_coefs: list[Tensor | None] = [None] * len(sizes)
        aux_coefs: list[Coef] = [aux_coef] * len(sizes)
    else:
        node_coefs = list(edge_weights.index_select(0, index).view(-1, 1, 1, 1).split(sizes))
        aux_coefs = [aux_coef * c for c in node_coefs]  # type: ignore[operator]
    # The accumulators of nodes max(0, j - 1) .. steps - 1 by part (see _state_terms), (batch, nodes, C, H, W).
    acc: dict[str, Tensor] = {}
    book = _Bookkeeping(plan.spans)
    for j, n in enumerate(sizes):
        # One coefficient tensor per operation (unbind: its backward is one stack, not a zero-filled select each).
        terms = _state_terms(plan.states[j], states[j], coefs[j].unbind(0), node_coefs[j], aux_coefs[j], k, book)
        for part, y, c in terms:
            acc[part] = _add(acc.get(part), y, c, n)
        if j >= 1:
            # The first node is complete; split it off (one split: its backward is one concatenation).
            done = {}
            for part, t in acc.items():
                if t.shape[1] > 1:
                    done[part], acc[part] = t.split([1, t.shape[1] - 1], dim=1)
                else:
                    done[part] = t
            states.append(_node(done, k).contiguous(memory_format=fmt))
    book.apply()
    return torch.cat(states[-cell.multiplier:], dim=1)


def _node(done: dict[str, Tensor], k: int) -> Tensor:
    """The node from its accumulators (each ``(batch, 1, C, H, W)``)."""
    if k == 1:
        return done["mix"].squeeze(1)
    out = robust.channel_shuffle(torch.cat([done["mix"], done["rest"]], dim=2).squeeze(1), k)
    return out + done["full"].squeeze(1) if "full" in done else out


def _state_terms(state: tuple[list[nn.Module], list[tuple[int, _Group]], _Group | None], h: Tensor,
                 coef: Sequence[Tensor], node_coef: Tensor | None, aux_coef: Coef, k: int, book: _Bookkeeping
                 ) -> list[tuple[str, Tensor, Coef]]:
    """``(part, y, c)``: the contributions ``c * y`` of the edges leaving state ``h`` (their plan
    ``state``) to their nodes' accumulators ``mix`` (the operations' channels), ``rest`` (PC-DARTS's
    bypass) and ``full`` (the auxiliary skip with partial channels, added after the shuffle)."""
    edges, ops, aux = state
    n = len(edges)
    if k == 1:
        selected, rest = h, None
    else:
        selected, rest = h.split([h.shape[1] // k, h.shape[1] - h.shape[1] // k], dim=1)
        selected = robust.like_format(selected, h)
    relu = F.relu(selected)
    repeated: Tensor | None = None
    terms: list[tuple[str, Tensor, Coef]] = []
    for o, group in ops:
        if group[0] == "skip":
            y = selected.unsqueeze(1)
        elif group[0] == "pool":
            y = _shared_pool(group[1], group[2], selected, book)
        else:
            if repeated is None:
                repeated = _repeat(relu, n)
            y = _relu_op(group, repeated, book)
        terms.append(("mix", y, coef[o]))
    if rest is not None:
        terms.append(("rest", edges[0].bypass(rest).unsqueeze(1), node_coef))
    if aux is not None:
        part = "mix" if k == 1 else "full"
        if aux[0] == "skip":
            y = h.unsqueeze(1)
        else:
            if k > 1:
                repeated = _repeat(F.relu(h), n)
            elif repeated is None:
                repeated = _repeat(relu, n)
            y = _relu_op(aux, repeated, book)
        terms.append((part, y, aux_coef))
    return terms
