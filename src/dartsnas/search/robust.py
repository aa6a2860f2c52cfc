"""Pieces of the robust mixed operations: PC-DARTS's channel shuffle and edge normalisation, DARTS-'s decay.

* PC-DARTS (Xu et al., ICLR 2020): section 3.2, eq. (3), sends ``1/K`` of an edge's channels through
  the mixed operation and the rest past it, then shuffles the channels (``K`` groups) so that other
  channels are sampled at the next edge; section 3.3, eq. (4), weighs each node's incoming edges by
  ``softmax(beta)`` over those edges.
* DARTS- (Chu et al., ICLR 2021): section 3.2, an auxiliary skip connection with a coefficient
  ``beta`` that decays linearly from ``beta_0`` to 0 over the search.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import lean


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave ``groups`` equal channel groups: output channel ``i * groups + g`` is channel ``i`` of group ``g``.

    The input's memory format (channels-last or not) is kept.
    """
    n, c, h, w = x.shape
    shuffled = x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)
    fmt = lean.memory_format(x)
    return shuffled.contiguous(memory_format=fmt) if fmt == torch.channels_last else shuffled


def like_format(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``part`` (a channel slice of ``whole``) laid out densely in ``whole``'s memory format.

    A channel slice of a channels-last tensor is strided; elementwise operations would return it in the
    plain layout, and the CPU's convolutions are several times slower on that layout.
    """
    return part.contiguous(memory_format=lean.memory_format(whole))


def node_softmax(betas: torch.Tensor, steps: int) -> torch.Tensor:
    """PC-DARTS eq. (4): ``softmax(beta)`` taken separately over the ``2 + i`` edges entering node ``i``.

    ``betas`` holds one value per edge in cell order (2, 3, 4, ... edges per node); so does the result.
    """
    parts, start = [], 0
    for i in range(steps):
        n = 2 + i
        parts.append(F.softmax(betas[start:start + n], dim=-1))
        start += n
    return torch.cat(parts)


def aux_skip_coefficient(beta0: float, epoch: int, epochs: int) -> float:
    """DARTS- section 3.2: the auxiliary skip's coefficient during ``epoch`` (0-based) of ``epochs``.

    Linear decay from ``beta0`` in the first epoch towards 0 at the end of the search:
    ``beta = beta0 * (1 - epoch / epochs)``.
    """
    return beta0 * (1.0 - epoch / epochs)
