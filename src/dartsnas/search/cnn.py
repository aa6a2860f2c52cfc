"""The convolutional search network: every edge is a softmax-weighted mixture of all operations.

Paper section 2.2, equation (2): ``o_bar(x) = sum_o softmax(alpha)_o * o(x)``. Alphas are
``nn.Parameter``s (so they are saved, restored and moved with the model) but kept out of the weight
optimizer: ``weight_parameters()`` and ``arch_parameters()`` split them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from ..genotype import CNN_PRIMITIVES, Genotype, derive_cnn_cell
from ..ops import lean
from ..ops.cnn import OPS, FactorizedReduce, ReLUConvBN, forward_after_relu, starts_with_relu
from . import dirichlet as drnas
from . import fused, pt, robust


class MixedOp(nn.Module):
    """One edge of the search cell.

    ``none`` is not instantiated: it adds exactly zero to the sum, so leaving it out changes no
    value and no gradient (its alpha still gets a gradient through the softmax normalisation).
    ``lean_memory`` swaps each operation's final batch norm and max pooling for the versions of
    :mod:`dartsnas.ops.lean` (same values and gradients, less memory).

    ``partial_channels`` K > 1 is PC-DARTS's partial channel connection (Xu et al. 2020, section 3.2,
    eq. 3): the first ``C / K`` channels go through the operations (built with ``C / K`` channels), the
    other channels bypass them (downsampled by 2x2 max pooling on a stride-2 edge, as in the authors'
    reduction cells), and a channel shuffle with K groups follows. ``aux_skip`` adds DARTS-'s auxiliary
    skip connection (Chu et al. 2021, section 3.2): ``beta * x`` outside the softmax, on a stride-2 edge
    ``beta * FactorizedReduce(x)`` (the skip connection of the reduction cells).
    """

    def __init__(self, C: int, stride: int, primitives: Sequence[str] = CNN_PRIMITIVES, lean_memory: bool = True,
                 partial_channels: int = 1, aux_skip: bool = False):
        super().__init__()
        if partial_channels < 1 or C % partial_channels:
            raise ValueError(f"{C} channels cannot be split into {partial_channels} equal parts")
        self.partial_channels = partial_channels
        C_op = C // partial_channels
        self.ops = nn.ModuleList()
        self.op_index: list[int] = []
        for i, name in enumerate(primitives):
            if name == "none":
                continue
            op = OPS[name](C_op, stride, False)
            if "pool" in name:
                # Pooling has no learnable scale; BN keeps its output on the same footing as the
                # convolutions' BN outputs (the authors' code, cnn/model_search.py ``MixedOp``).
                op = nn.Sequential(op, nn.BatchNorm2d(C_op, affine=False))
            self.ops.append(lean.make_lean(op) if lean_memory else op)
            self.op_index.append(i)
        self.relu_first = [starts_with_relu(op) for op in self.ops]
        self.bypass_pool: nn.Module | None = None
        if partial_channels > 1 and stride == 2:
            self.bypass_pool = nn.MaxPool2d(2, 2)
            if lean_memory:
                self.bypass_pool = lean.make_lean(self.bypass_pool)
        self.aux: nn.Module | None = None
        if aux_skip:
            self.aux = nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine=False)

    def mix(self, x: torch.Tensor, weights: torch.Tensor, x_relu: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_o weights[o] * o(x)``; ``x_relu = relu(x)``, when given, is shared by every
        ReLU-Conv-BN operation instead of each computing (and storing) its own."""
        out: torch.Tensor | None = None
        for i, op, relu_first in zip(self.op_index, self.ops, self.relu_first):
            y = forward_after_relu(op, x_relu) if relu_first and x_relu is not None else op(x)
            y = weights[i] * y
            out = y if out is None else out + y
        assert out is not None
        return out

    def bypass(self, rest: torch.Tensor) -> torch.Tensor:
        """PC-DARTS: the channels that bypass the operations, downsampled on a stride-2 edge."""
        if self.bypass_pool is None:
            return rest
        # On odd sizes, rounding up keeps the operations' output size.
        odd = rest.shape[-1] % 2 or rest.shape[-2] % 2
        return F.max_pool2d(rest, 2, 2, ceil_mode=True) if odd else self.bypass_pool(rest)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, x_relu: torch.Tensor | None = None,
                aux_coef: float = 0.0) -> torch.Tensor:
        """The edge's output; ``x_relu``, when given, is ``relu`` of the channels that go through the
        operations (``x[:, :C/K]``; all of ``x`` when K = 1)."""
        k = self.partial_channels
        if k == 1:
            out = self.mix(x, weights, x_relu)
        else:
            # PC-DARTS eq. (3): S * x through the operations, (1 - S) * x past them, then the shuffle.
            # One split (not two slices): the backward assembles one gradient of x, not two zero-padded ones.
            selected, rest = x.split([x.shape[1] // k, x.shape[1] - x.shape[1] // k], dim=1)
            mixed = self.mix(robust.like_format(selected, x), weights, x_relu)
            out = robust.channel_shuffle(torch.cat([mixed, self.bypass(rest)], dim=1), k)
        if self.aux is not None:
            share = k == 1 and x_relu is not None and isinstance(self.aux, FactorizedReduce)
            out = out + aux_coef * (self.aux.forward_after_relu(x_relu) if share else self.aux(x))
        return out


class SearchCell(nn.Module):
    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool, primitives: Sequence[str] = CNN_PRIMITIVES, lean_memory: bool = True,
                 partial_channels: int = 1, aux_skip: bool = False):
        super().__init__()
        self.reduction = reduction
        # All edges leaving a state computed together (search/fused.py): the same values, far fewer kernels.
        self.fused = True
        self.steps = steps
        self.multiplier = multiplier
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        if lean_memory:
            # Their outputs are states, which the cell keeps anyway (skip and pooling edges).
            lean.make_lean(self.preprocess0)
            lean.make_lean(self.preprocess1)
        self.edges = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                # Only edges leaving the cell's two inputs reduce the resolution.
                stride = 2 if reduction and j < 2 else 1
                self.edges.append(MixedOp(C, stride, primitives, lean_memory, partial_channels, aux_skip))

    def _relu(self, h: torch.Tensor) -> torch.Tensor:
        # With partial channels, the operations of every edge leaving h see only its first C/K channels.
        k = self.edges[0].partial_channels
        return F.relu(h if k == 1 else robust.like_format(h[:, :h.shape[1] // k], h))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                edge_weights: torch.Tensor | None = None, aux_coef: float = 0.0) -> torch.Tensor:
        """The cell's output; ``edge_weights`` (one per edge, PC-DARTS eq. 4) scale each edge's output
        in its node's sum, ``aux_coef`` is the auxiliary skip's coefficient (DARTS-)."""
        plan = fused.cell_plan(self) if self.fused else None
        if plan is not None:
            return fused.cell_forward(self, plan, s0, s1, weights, edge_weights, aux_coef)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        # One ReLU per state, shared by all operations on all edges leaving it: the same values as
        # a ReLU per operation, with a fraction of the memory and time.
        relus = [self._relu(h) for h in states]
        offset = 0
        for step in range(self.steps):
            s = None
            for j, h in enumerate(states):
                y = self.edges[offset + j](h, weights[offset + j], relus[j], aux_coef)
                if edge_weights is not None:
                    y = edge_weights[offset + j] * y
                s = y if s is None else s + y
            offset += len(states)
            states.append(s)
            if step + 1 < self.steps:
                relus.append(self._relu(s))
        return torch.cat(states[-self.multiplier:], dim=1)


class _RecomputeAsInForward:
    """Entered around a cell's recomputation in the backward: the recomputation changes nothing the
    forward has not already changed, and builds the same graph as the forward.

    * Batch norms in training mode update their running statistics (and ``num_batches_tracked``)
      on every call, so recomputing the cell would count each batch twice. During the
      recomputation every buffer of the cell is replaced by a copy, and the cell's own buffers are
      put back afterwards, untouched. (Writing a snapshot back into them in place instead would
      bump their version counters, and a recomputed batch norm saves its running statistics for a
      double backward: the exact Hessian-vector product would then fail.) The copies hold the
      buffers' values, and in training mode the running statistics do not enter the output anyway.
    * :mod:`dartsnas.ops.lean` switches its operations per thread; a forward run inside
      :func:`lean.plain` (a graph that is differentiated twice) may be differentiated outside it, or
      in another thread (autograd runs a CUDA backward in its own threads), and the recomputation
      must build the same kind of graph as the forward did.

    Re-entrant (a stack): a graph kept with ``retain_graph`` is recomputed once per backward.
    """

    def __init__(self, cell: nn.Module):
        self.cell = cell
        self.lean = lean.enabled()  # constructed in the forward: the forward's setting
        self._stack: list[tuple[list[tuple[nn.Module, str, torch.Tensor]], contextlib.ExitStack]] = []

    def __enter__(self) -> None:
        originals = []
        for module in self.cell.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                originals.append((module, name, buffer))
                setattr(module, name, buffer.detach().clone())
        mode = contextlib.ExitStack()
        mode.enter_context(lean.using(self.lean))
        self._stack.append((originals, mode))

    def __exit__(self, *exc: object) -> None:
        originals, mode = self._stack.pop()
        mode.close()
        for module, name, buffer in originals:
            setattr(module, name, buffer)


def _checkpointed_cell(cell: nn.Module, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                       edge_weights: torch.Tensor | None = None, aux_coef: float = 0.0) -> torch.Tensor:
    """``cell(s0, s1, weights, edge_weights, aux_coef)`` keeping only the inputs for the backward, which runs the cell again.

    The recomputation happens during the backward, when a :func:`torch.func.functional_call` that
    substituted the weights of the forward (the architect's virtual and perturbed weights) has
    already put the module's own parameters back. So the parameter tensors the cell uses now are
    passed to the checkpointed function as inputs and substituted again there: the recomputation
    uses exactly the tensors of the forward, and gradients reach them.
    """
    named = list(cell.named_parameters())
    names, tensors = [n for n, _ in named], [t for _, t in named]
    edge_grad = edge_weights is not None and edge_weights.requires_grad
    if not (s0.requires_grad or s1.requires_grad or weights.requires_grad or edge_grad
            or any(t.requires_grad for t in tensors)):
        return cell(s0, s1, weights, edge_weights=edge_weights, aux_coef=aux_coef)

    def run(s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor, edge_weights: torch.Tensor | None,
            *params: torch.Tensor) -> torch.Tensor:
        return functional_call(cell, dict(zip(names, params)), (s0, s1, weights),
                               {"edge_weights": edge_weights, "aux_coef": aux_coef})

    restore = _RecomputeAsInForward(cell)
    return checkpoint(run, s0, s1, weights, edge_weights, *tensors, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), restore))


def _plain_cell(cell: nn.Module, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                edge_weights: torch.Tensor | None, aux_coef: float) -> torch.Tensor:
    return cell(s0, s1, weights, edge_weights=edge_weights, aux_coef=aux_coef)


def num_edges(steps: int) -> int:
    """Edges of a cell with ``steps`` intermediate nodes: 2 + 3 + ... = 14 for 4 nodes."""
    return sum(2 + i for i in range(steps))


class SearchNetwork(nn.Module):
    """The one-shot network of paper section 3.1: 8 cells, reductions at 1/3 and 2/3 depth."""

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8, steps: int = 4, multiplier: int = 4,
                 stem_multiplier: int = 3, in_channels: int = 3, primitives: Sequence[str] = CNN_PRIMITIVES,
                 lean_memory: bool = True, checkpoint_cells: bool = False, dirichlet: bool = False,
                 partial_channels: int = 1, edge_normalization: bool = False, aux_skip: bool = False,
                 fused: bool = True):
        super().__init__()
        if layers < 3:
            raise ValueError(f"the search network needs at least 3 cells (two of them reduction cells), got {layers}")
        if partial_channels < 1 or C % partial_channels:
            raise ValueError(f"partial channels: {C} channels cannot be split into {partial_channels} equal parts")
        self.primitives = tuple(primitives)
        self.steps = steps
        self.multiplier = multiplier
        # Keep only each cell's inputs during the forward and recompute its activations in the
        # backward (see _checkpointed_cell): much less memory, a slower step, the same numbers.
        self.checkpoint_cells = checkpoint_cells
        # DrNAS (search/dirichlet.py): Dirichlet mixing weights instead of softmax; a sample in training
        # (from ``dirichlet_seed`` when set), the mean otherwise.
        self.dirichlet = dirichlet
        self.dirichlet_seed: int | None = None
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = SearchCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, primitives,
                              lean_memory, partial_channels, aux_skip)
            cell.fused = fused  # False: edge by edge (the same values; search/fused.py)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        k, n = num_edges(steps), len(self.primitives)
        # Initialised small so that every operation starts with (almost) equal weight.
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(k, n))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(k, n))
        # PC-DARTS edge normalisation (section 3.3, eq. 4): one beta per edge, softmaxed over each node's
        # incoming edges. Drawn after the alphas, so that without it the random draws are plain DARTS's.
        self.edge_normalization = edge_normalization
        if edge_normalization:
            self.betas_normal = nn.Parameter(1e-3 * torch.randn(k))
            self.betas_reduce = nn.Parameter(1e-3 * torch.randn(k))
        # DARTS- (section 3.2): the auxiliary skip's current coefficient, set every epoch by the search.
        self.aux_skip_coef = 0.0
        # DARTS-PT's decisions (normal, reduce) applied to the mixing weights, set during a PT selection.
        self.projection: tuple[pt.CellProjection, pt.CellProjection] | None = None

    def named_arch_parameters(self) -> list[tuple[str, nn.Parameter]]:
        names = ["alphas_normal", "alphas_reduce"]
        if self.edge_normalization:
            names += ["betas_normal", "betas_reduce"]
        return [(name, getattr(self, name)) for name in names]

    def arch_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_arch_parameters()]

    def named_weight_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        arch = {name for name, _ in self.named_arch_parameters()}
        for name, p in self.named_parameters():
            if name not in arch:
                yield name, p

    def edge_weights(self, reduction: bool) -> torch.Tensor | None:
        """PC-DARTS eq. (4): softmax(beta) over each node's incoming edges (None without edge normalisation)."""
        if not self.edge_normalization:
            return None
        return robust.node_softmax(self.betas_reduce if reduction else self.betas_normal, self.steps)

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_weight_parameters()]

    def mixing_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixing weights of the normal and the reduction cells: ``softmax(alpha)`` (paper eq. 2), or
        with ``dirichlet`` a sample of ``Dir(elu(alpha) + 1)`` in training and its mean otherwise."""
        if not self.dirichlet:
            w_normal, w_reduce = F.softmax(self.alphas_normal, dim=-1), F.softmax(self.alphas_reduce, dim=-1)
        elif self.training:
            w_normal, w_reduce = drnas.sample_weights([self.alphas_normal, self.alphas_reduce], self.dirichlet_seed)
        else:
            w_normal, w_reduce = drnas.mean_weights(self.alphas_normal), drnas.mean_weights(self.alphas_reduce)
        if self.projection is not None:
            # DARTS-PT (search/pt.py): the edges decided so far are one-hot, the inputs a node dropped zero.
            w_normal, w_reduce = self.projection[0].apply(w_normal), self.projection[1].apply(w_reduce)
        return w_normal, w_reduce

    def forward(self, x: torch.Tensor, mixing: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of ``x``; ``mixing`` = (normal, reduce) weights replaces :meth:`mixing_weights` (the
        perturbed weights of a smoothed weight step, :mod:`.alpha_noise`)."""
        w_normal, w_reduce = self.mixing_weights() if mixing is None else mixing
        s0 = s1 = self.stem(x)
        # Without a graph there is nothing to keep, hence nothing to save by recomputing.
        recompute = self.checkpoint_cells and torch.is_grad_enabled()
        e_normal, e_reduce = self.edge_weights(False), self.edge_weights(True)
        for cell in self.cells:
            weights = w_reduce if cell.reduction else w_normal
            edges = e_reduce if cell.reduction else e_normal
            run = _checkpointed_cell if recompute else _plain_cell
            s0, s1 = s1, run(cell, s0, s1, weights, edges, self.aux_skip_coef)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1))

    @torch.no_grad()
    def arch_weights(self) -> dict[str, list[list[float]]]:
        """Softmaxed alphas (with ``dirichlet``: the Dirichlet means) as nested lists (the per-epoch record
        behind plots and animations, and the weights the cell is derived from)."""
        weigh = drnas.mean_weights if self.dirichlet else (lambda a: F.softmax(a, dim=-1))
        return {
            "normal": weigh(self.alphas_normal.float()).tolist(),
            "reduce": weigh(self.alphas_reduce.float()).tolist(),
        }

    @torch.no_grad()
    def selection_weights(self) -> dict[str, list[list[float]]]:
        """The weights the derivation ranks: softmaxed alphas, with edge normalisation each row times its
        edge's softmax(beta) (PC-DARTS section 3.3: the two normalised coefficients are multiplied)."""
        weights = self.arch_weights()
        if not self.edge_normalization:
            return weights
        for kind, reduction in (("normal", False), ("reduce", True)):
            edges = self.edge_weights(reduction)
            assert edges is not None
            weights[kind] = [[w * e for w in row] for row, e in zip(weights[kind], edges.float().tolist())]
        return weights

    def genotype(self) -> Genotype:
        """Derive the discrete cell by the paper's rule (section 2.4)."""
        weights = self.selection_weights()
        concat = list(range(2 + self.steps - self.multiplier, self.steps + 2))
        return Genotype(
            normal=derive_cnn_cell(weights["normal"], self.primitives, self.steps),
            normal_concat=concat,
            reduce=derive_cnn_cell(weights["reduce"], self.primitives, self.steps),
            reduce_concat=concat,
        )
