"""Beta-Decay regularisation of the alphas (Ye et al., "beta-DARTS", CVPR 2022).

beta-DARTS adds to the alpha (validation) objective of DARTS (paper eq. 3) a penalty on the
softmax-activated architecture parameters, written on the alphas themselves: for every edge the
log-sum-exp of its alphas (the smooth maximum, whose gradient is the edge's softmax),

    L_Beta = mean over edges (i, j) of  log sum_k exp(alpha_k^(i,j)),
    min_alpha  L_val(w*(alpha), alpha) + lambda_e * L_Beta,

(beta-DARTS, the "Beta-Decay regularization" method section: the regulariser, written on the alphas
as a log-sum-exp, and the regularised alpha objective; the authors' code computes it as
``mean(logsumexp(alpha, dim=-1))``).
Its gradient ``softmax(alpha) / n_edges`` pushes the larger alphas down harder than the smaller ones,
which keeps the activated weights (and their variance) from growing: the "decay".

The weight grows linearly over the search, ``lambda_e = lambda * e / E`` for epoch ``e = 0 .. E-1``
(the paper's linearly increasing regularisation weight; the authors' code sets ``0 + 50 * epoch / 100``
for 50 epochs): 0 in the first epoch, ``lambda * (E - 1) / E`` in the last.

The penalty depends on alpha only, so it adds the same term to the first- and the second-order alpha
gradient (DARTS eq. 7): it does not enter the virtual weight step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def beta_decay_loss(alphas: Sequence[Tensor]) -> Tensor:
    """``L_Beta``: the log-sum-exp of each edge's alphas (one row per edge), averaged over all edges of
    all the given alpha matrices (normal and reduction cell)."""
    if not alphas:
        raise ValueError("beta_decay_loss needs at least one alpha matrix")
    per_edge = torch.cat([torch.logsumexp(a, dim=-1).reshape(-1) for a in alphas])
    return per_edge.mean()


def beta_decay_weight(lam: float, epoch: int, epochs: int) -> float:
    """``lambda_e = lam * epoch / epochs``: the weight of ``L_Beta`` in epoch ``epoch`` (0-based)."""
    return lam * epoch / epochs
