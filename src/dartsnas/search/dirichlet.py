"""Dirichlet mixing weights (DrNAS: Chen et al., ICLR 2021, "DrNAS: Dirichlet Neural Architecture Search").

DrNAS treats each edge's mixing weights as a random variable, ``theta ~ Dir(beta)``, and learns the
concentration ``beta`` (the paper's method section: the distribution-learning objective):

    min_beta  E_{theta ~ Dir(beta)} [ L_val(w*, theta) ] + lambda * d(beta, beta_hat),
    w* = argmin_w E_{theta ~ Dir(beta)} [ L_train(w, theta) ].

* ``beta = elu(alpha) + 1`` keeps the concentration positive (the authors' code, DARTS-space
  ``model_search.py``: ``F.elu(alpha) + 1``);
* the expectation is estimated with one sample per step, differentiated by the pathwise
  (reparameterised) derivative of the Dirichlet (the paper's "pathwise derivative estimator";
  ``torch.distributions.Dirichlet.rsample``);
* the anchor regulariser ``d`` pulls ``beta`` towards ``beta_hat = 1`` (the uniform Dirichlet): here
  the KL divergence ``sum_edges KL(Dir(beta) || Dir(1))`` (the authors' ``reg_type='kl'``); the
  paper's other choice, an L2 penalty (its DARTS-space setting, 1e-3), is Adam's weight decay of alpha,
  ``--arch_weight_decay`` (1e-3 by default);
* outside training (evaluation, derivation of the cell) the weights are the Dirichlet mean
  ``beta / sum(beta)``. (The authors' code derives the cell from ``softmax(alpha)``: the same choice of
  operation on every edge, a possibly different choice of the two strongest input edges.)

Sampling with a given ``seed`` draws the same ``theta`` for the same ``alpha`` every time, so that every
loss of one alpha step (the virtual step, the validation loss at ``w'`` and the finite-difference
Hessian-vector product, DARTS eq. 7-8) sees the same sample (one-sample estimate of the whole step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Dirichlet, kl_divergence


def concentration(alpha: Tensor) -> Tensor:
    """``beta = elu(alpha) + 1`` (positive; 1 at ``alpha = 0``)."""
    return F.elu(alpha) + 1.0


def mean_weights(alpha: Tensor) -> Tensor:
    """The Dirichlet mean ``beta / sum(beta)`` along each row."""
    beta = concentration(alpha)
    return beta / beta.sum(dim=-1, keepdim=True)


def sample_weights(alphas: Sequence[Tensor], seed: int | None = None) -> list[Tensor]:
    """One reparameterised sample ``theta ~ Dir(elu(alpha) + 1)`` per row of each matrix; with ``seed``,
    drawn from a generator state of that seed (the global state is left as it was)."""
    if seed is None:
        return [Dirichlet(concentration(a)).rsample() for a in alphas]
    devices = [a.device for a in alphas if a.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return [Dirichlet(concentration(a)).rsample() for a in alphas]


def kl_to_uniform(alphas: Sequence[Tensor]) -> Tensor:
    """``sum over edges of KL(Dir(elu(alpha) + 1) || Dir(1, ..., 1))`` over all matrices."""
    total = []
    for a in alphas:
        beta = concentration(a)
        total.append(kl_divergence(Dirichlet(beta), Dirichlet(torch.ones_like(beta))).sum())
    return torch.stack(total).sum()
