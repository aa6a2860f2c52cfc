"""The convolutional search network: every edge is a softmax-weighted mixture of all operations.

Paper section 2.2, equation (2): ``o_bar(x) = sum_o softmax(alpha)_o * o(x)``. Alphas are
``nn.Parameter``s (so they are saved, restored and moved with the model) but kept out of the weight
optimizer: ``weight_parameters()`` and ``arch_parameters()`` split them.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..genotype import CNN_PRIMITIVES, Genotype, derive_cnn_cell
from ..ops.cnn import OPS, FactorizedReduce, ReLUConvBN, forward_after_relu, starts_with_relu


class MixedOp(nn.Module):
    """One edge of the search cell.

    ``none`` is not instantiated: it adds exactly zero to the sum, so leaving it out changes no
    value and no gradient (its alpha still gets a gradient through the softmax normalisation).
    """

    def __init__(self, C: int, stride: int, primitives: Sequence[str] = CNN_PRIMITIVES):
        super().__init__()
        self.ops = nn.ModuleList()
        self.op_index: list[int] = []
        for i, name in enumerate(primitives):
            if name == "none":
                continue
            op = OPS[name](C, stride, False)
            if "pool" in name:
                # Pooling has no learnable scale; BN keeps its output on the same footing as the
                # convolutions' BN outputs (authors' code, facts section 1).
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self.ops.append(op)
            self.op_index.append(i)
        self.relu_first = [starts_with_relu(op) for op in self.ops]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, x_relu: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_o weights[o] * o(x)``; ``x_relu = relu(x)``, when given, is shared by every
        ReLU-Conv-BN operation instead of each computing (and storing) its own."""
        out: torch.Tensor | None = None
        for i, op, relu_first in zip(self.op_index, self.ops, self.relu_first):
            y = forward_after_relu(op, x_relu) if relu_first and x_relu is not None else op(x)
            y = weights[i] * y
            out = y if out is None else out + y
        assert out is not None
        return out


class SearchCell(nn.Module):
    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool, primitives: Sequence[str] = CNN_PRIMITIVES):
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                # Only edges leaving the cell's two inputs reduce the resolution.
                stride = 2 if reduction and j < 2 else 1
                self.edges.append(MixedOp(C, stride, primitives))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        # One ReLU per state, shared by all operations on all edges leaving it: the same values as
        # a ReLU per operation, with a fraction of the memory and time.
        relus = [F.relu(h) for h in states]
        offset = 0
        for step in range(self.steps):
            s = None
            for j, h in enumerate(states):
                y = self.edges[offset + j](h, weights[offset + j], relus[j])
                s = y if s is None else s + y
            offset += len(states)
            states.append(s)
            if step + 1 < self.steps:
                relus.append(F.relu(s))
        return torch.cat(states[-self.multiplier:], dim=1)


def num_edges(steps: int) -> int:
    """Edges of a cell with ``steps`` intermediate nodes: 2 + 3 + ... = 14 for 4 nodes."""
    return sum(2 + i for i in range(steps))


class SearchNetwork(nn.Module):
    """The one-shot network of paper section 3.1: 8 cells, reductions at 1/3 and 2/3 depth."""

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8, steps: int = 4, multiplier: int = 4,
                 stem_multiplier: int = 3, in_channels: int = 3, primitives: Sequence[str] = CNN_PRIMITIVES):
        super().__init__()
        if layers < 3:
            raise ValueError(f"the search network needs at least 3 cells (two of them reduction cells), got {layers}")
        self.primitives = tuple(primitives)
        self.steps = steps
        self.multiplier = multiplier
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = SearchCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, primitives)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        k, n = num_edges(steps), len(self.primitives)
        # Initialised small so that every operation starts with (almost) equal weight.
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(k, n))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(k, n))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas_normal, self.alphas_reduce]

    def named_weight_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            if not name.startswith("alphas_"):
                yield name, p

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_weight_parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_normal = F.softmax(self.alphas_normal, dim=-1)
        w_reduce = F.softmax(self.alphas_reduce, dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1))

    @torch.no_grad()
    def arch_weights(self) -> dict[str, list[list[float]]]:
        """Softmaxed alphas as nested lists (the per-epoch record behind plots and animations)."""
        return {
            "normal": F.softmax(self.alphas_normal.float(), dim=-1).tolist(),
            "reduce": F.softmax(self.alphas_reduce.float(), dim=-1).tolist(),
        }

    def genotype(self) -> Genotype:
        """Derive the discrete cell by the paper's rule (section 2.4)."""
        weights = self.arch_weights()
        concat = list(range(2 + self.steps - self.multiplier, self.steps + 2))
        return Genotype(
            normal=derive_cnn_cell(weights["normal"], self.primitives, self.steps),
            normal_concat=concat,
            reduce=derive_cnn_cell(weights["reduce"], self.primitives, self.steps),
            reduce_concat=concat,
        )
