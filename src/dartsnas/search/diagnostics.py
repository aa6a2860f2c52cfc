"""Per-epoch diagnostics of a search: what the derived cells are made of, how sure the alphas are,
and how much the derived architecture still moves.

* the number of ``skip_connect`` edges and of parameter-free edges (skip, max and average pooling) in
  a derived convolutional cell: many of them is the collapse that the robust-search papers (SDARTS,
  beta-DARTS, DrNAS) set out to prevent;
* the mean entropy of the edges' softmaxed alphas (natural logarithm; ``log n`` for uniform
  weights over ``n`` operations, 0 for a one-hot edge);
* how many edges (operation or input) of the derived genotype differ from the previous one.

Pure functions on genotypes and alpha matrices; the search engines call them once per epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..genotype import Edge, Genotype, RecurrentGenotype

PARAMETER_FREE = frozenset({"skip_connect", "max_pool_3x3", "avg_pool_3x3"})


def count_ops(edges: Iterable[Edge], names: Iterable[str]) -> int:
    """Edges whose operation is one of ``names``."""
    wanted = frozenset(names)
    return sum(1 for op, _ in edges if op in wanted)


def mean_entropy(alpha: Tensor) -> float:
    """Entropy of ``softmax(alpha)`` along each row (one row per edge), averaged over the rows."""
    p = F.softmax(alpha.detach().double(), dim=-1)
    return float(-(p * torch.log(p.clamp_min(1e-300))).sum(dim=-1).mean())


def edges_changed(old: Sequence[Edge], new: Sequence[Edge]) -> int:
    """Positions whose ``(operation, input)`` differ between two derivations of the same cell."""
    if len(old) != len(new):
        raise ValueError(f"cells of {len(old)} and {len(new)} edges cannot be compared")
    return sum(1 for a, b in zip(old, new) if tuple(a) != tuple(b))


def cnn_diagnostics(genotype: Genotype, previous: Genotype, alphas_normal: Tensor, alphas_reduce: Tensor
                    ) -> dict[str, Any]:
    """The metrics-record entries of a convolutional search epoch."""
    return {
        "skip_normal": count_ops(genotype.normal, ("skip_connect",)),
        "skip_reduce": count_ops(genotype.reduce, ("skip_connect",)),
        "param_free_normal": count_ops(genotype.normal, PARAMETER_FREE),
        "param_free_reduce": count_ops(genotype.reduce, PARAMETER_FREE),
        "entropy_normal": mean_entropy(alphas_normal),
        "entropy_reduce": mean_entropy(alphas_reduce),
        "genotype_changes": edges_changed(previous.normal, genotype.normal)
        + edges_changed(previous.reduce, genotype.reduce),
    }


def rnn_diagnostics(genotype: RecurrentGenotype, previous: RecurrentGenotype, alphas: Tensor) -> dict[str, Any]:
    """The metrics-record entries of a recurrent search epoch (every recurrent edge has its own weights,
    so only the identity count stands for the parameter-free choice)."""
    return {
        "identity": count_ops(genotype.recurrent, ("identity",)),
        "entropy": mean_entropy(alphas),
        "genotype_changes": edges_changed(previous.recurrent, genotype.recurrent),
    }
