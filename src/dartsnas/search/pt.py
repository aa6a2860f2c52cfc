"""DARTS-PT: perturbation-based architecture selection (Wang et al., "Rethinking Architecture Selection in
Differentiable NAS", ICLR 2021, section 4 and Algorithm 1).

Instead of reading the final cell off the magnitudes of alpha (DARTS section 2.4), each operation is
judged by what the trained supernet loses without it: on an edge, the operation whose removal lowers
the validation accuracy most is kept and the edge is discretised to it; once every edge has its
operation, each node keeps the two input edges whose removal lowers the accuracy most.

This module holds the pure parts: which edges are decided (:class:`CellProjection`), how a decision
changes the mixing weights the cells receive (:meth:`CellProjection.apply`), the order of the
decisions, the ranking of the scores and the final genotype. Removing an operation or an edge is done
on the mixing-weight tensor only (its weight set to zero, the other weights left as they are: the
paper's ``S \\ o``), so the network itself is never altered.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..genotype import Edge

# (accuracy, loss) of the supernet on the validation data.
Score = tuple[float, float]


def node_edges(steps: int) -> list[list[int]]:
    """The edge indices entering each intermediate node, in cell order: [[0, 1], [2, 3, 4], ...]."""
    out, start = [], 0
    for i in range(steps):
        out.append(list(range(start, start + i + 2)))
        start += i + 2
    return out


@dataclass
class CellProjection:
    """The decisions made so far in one cell type: ``ops[edge]`` is the operation (column of alpha) an
    edge was discretised to, ``kept[node]`` the input edges a node keeps (most important first)."""

    steps: int
    ops: dict[int, int] = field(default_factory=dict)
    kept: dict[int, list[int]] = field(default_factory=dict)

    def apply(self, weights: torch.Tensor) -> torch.Tensor:
        """The mixing weights with the decisions in force: a decided edge's row is one-hot on its
        operation (Algorithm 1, "discretize edge e to o*"), an edge its node dropped is all zero.
        Undecided rows keep their (differentiable) weights."""
        if not self.ops and not self.kept:
            return weights
        keep = torch.ones(weights.shape[0], 1, dtype=weights.dtype, device=weights.device)
        fixed = torch.zeros_like(weights)
        for edge, op in self.ops.items():
            keep[edge] = 0
            fixed[edge, op] = 1
        for node, kept in self.kept.items():
            for edge in node_edges(self.steps)[node]:
                if edge not in kept:
                    keep[edge] = 0
                    fixed[edge] = 0
        return weights * keep + fixed

    def to_dict(self) -> dict[str, Any]:
        return {"ops": {str(k): v for k, v in self.ops.items()}, "kept": {str(k): v for k, v in self.kept.items()}}

    @classmethod
    def from_dict(cls, steps: int, data: dict[str, Any]) -> CellProjection:
        return cls(steps, {int(k): int(v) for k, v in data["ops"].items()},
                   {int(k): [int(e) for e in v] for k, v in data["kept"].items()})


def without(weights: torch.Tensor, edge: int, op: int | None = None) -> torch.Tensor:
    """``weights`` with operation ``op`` of ``edge`` removed (its weight zero), or with the whole edge
    removed when ``op`` is None; the other weights are not renormalised."""
    out = weights.detach().clone()
    if op is None:
        out[edge] = 0
    else:
        out[edge, op] = 0
    return out


def hurt_order(scores: dict[int, Score], criterion: str = "acc") -> list[int]:
    """Candidates ordered by how much their removal hurts, most first: lowest accuracy (ties: highest
    loss), or with ``criterion`` 'loss' highest loss (ties: lowest accuracy); remaining ties keep the
    lower index first."""
    if criterion == "acc":
        return sorted(scores, key=lambda k: (scores[k][0], -scores[k][1], k))
    return sorted(scores, key=lambda k: (-scores[k][1], scores[k][0], k))


def op_candidates(primitives: Sequence[str]) -> list[int]:
    """The operations an edge may be discretised to: all but ``none`` (removing it changes nothing, and
    a final cell never contains it, DARTS section 2.4)."""
    return [k for k, name in enumerate(primitives) if name != "none"]


def select_op(evaluate: Callable[[torch.Tensor], Score], weights: torch.Tensor, edge: int,
              candidates: Sequence[int], criterion: str = "acc") -> tuple[int, dict[int, Score]]:
    """Algorithm 1, first loop: score ``S \\ o`` for every candidate operation of ``edge`` and keep the
    one whose removal hurts most. ``evaluate(weights)`` is the supernet's (accuracy, loss)."""
    scores = {op: evaluate(without(weights, edge, op)) for op in candidates}
    return hurt_order(scores, criterion)[0], scores


def select_edges(evaluate: Callable[[torch.Tensor], Score], weights: torch.Tensor, edges: Sequence[int],
                 keep: int = 2, criterion: str = "acc") -> tuple[list[int], dict[int, Score]]:
    """Algorithm 1, second loop: score the supernet without each input edge of a node and keep the
    ``keep`` edges whose removal hurts most (most important first)."""
    scores = {edge: evaluate(without(weights, edge)) for edge in edges}
    return hurt_order(scores, criterion)[:keep], scores


@dataclass(frozen=True)
class Decision:
    """One decision of a round: an edge's operation (``kind`` 'op') or a node's inputs ('edges')."""

    cell: str  # 'normal' or 'reduce'
    kind: str
    target: int  # the edge (kind 'op') or the intermediate node (kind 'edges')


def schedule(steps: int, seed: int) -> list[list[Decision]]:
    """The rounds of decisions: first every edge's operation, then the inputs of every node with more
    than two (a node with two keeps both), each in a random order drawn from ``seed`` (the paper's
    random edge order). One edge (then one node) of each cell type per round, as in the authors'
    code, and the supernet is tuned between rounds."""
    rng = random.Random(seed)
    n_edges = sum(i + 2 for i in range(steps))
    edge_order = {cell: rng.sample(range(n_edges), n_edges) for cell in ("normal", "reduce")}
    nodes = [i for i in range(steps) if i + 2 > 2]
    node_order = {cell: rng.sample(nodes, len(nodes)) for cell in ("normal", "reduce")}
    rounds = [[Decision(cell, "op", edge_order[cell][r]) for cell in ("normal", "reduce")] for r in range(n_edges)]
    rounds += [[Decision(cell, "edges", node_order[cell][r]) for cell in ("normal", "reduce")]
               for r in range(len(nodes))]
    return rounds


def cell_genotype(projection: CellProjection, primitives: Sequence[str]) -> list[Edge]:
    """The discrete cell of a finished projection: per node, its kept edges (a node with two inputs keeps
    both, in input order) with their operations, as ``(operation, input)`` pairs."""
    gene: list[Edge] = []
    for node, edges in enumerate(node_edges(projection.steps)):
        kept = projection.kept.get(node, edges if len(edges) == 2 else None)
        if kept is None or any(e not in projection.ops for e in kept):
            raise ValueError(f"node {node} has no complete decision yet")
        gene.extend((primitives[projection.ops[e]], edges.index(e)) for e in kept)
    return gene
