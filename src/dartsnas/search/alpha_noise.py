"""Perturbed mixing weights in the weight step: random smoothing (SDARTS-RS) and its adversarial
variant (SDARTS-ADV), Chen & Hsieh, ICML 2020, "Stabilizing Differentiable Architecture Search via
Perturbation-based Regularization".

SDARTS-RS trains the weights for a neighbourhood of the architecture instead of one point (the
paper's "Proposed method" section, the random-smoothing objective, SDARTS-RS):

    min_alpha L_val(w*(alpha), alpha),   w*(alpha) = argmin_w E_{delta ~ U[-eps, eps]} L_train(w, A + delta).

The perturbation is on the *softmaxed* architecture weights ``A = softmax(alpha)`` (the paper's
A-bar; the authors' code softmaxes the alphas, adds the noise, then clips each edge back onto the
simplex: clamp to [0, 1] and divide by the row sum; a row that clamps to all zeros becomes one-hot
at its noisy maximum). One sample per weight step; the alpha step sees the clean alphas.

The noise bound grows linearly over the search, from a tenth of ``eps`` to ``eps``:
``eps_e = eps * (0.1 + 0.9 * e / E)``, which is the authors' schedule 0.03 -> 0.3 for their default
``eps = 0.3`` (their search script: ``0.03 + (eps - 0.03) * epoch / epochs``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def noise_bound(eps: float, epoch: int, epochs: int) -> float:
    """``eps_e``: the half-width of the uniform noise in epoch ``epoch`` (0-based)."""
    return eps * (0.1 + 0.9 * epoch / epochs)


def project_rows(weights: Tensor) -> Tensor:
    """Each row clamped to [0, 1] and scaled to sum 1 (an all-zero row: one-hot at its maximum)."""
    clamped = weights.clamp(0.0, 1.0)
    sums = clamped.sum(dim=-1, keepdim=True)
    one_hot = F.one_hot(weights.argmax(dim=-1), weights.shape[-1]).to(weights.dtype)
    dead = sums == 0
    return torch.where(dead, one_hot, clamped / torch.where(dead, torch.ones_like(sums), sums))


def perturbed_weights(alpha: Tensor, bound: float, generator: torch.Generator) -> Tensor:
    """``project(softmax(alpha) + delta)``, ``delta ~ U[-bound, bound]`` drawn from ``generator`` (a CPU
    generator, so that every device and every process draws the same numbers)."""
    u = torch.rand(alpha.shape, generator=generator, dtype=torch.float64)
    delta = ((2.0 * u - 1.0) * bound).to(device=alpha.device, dtype=alpha.dtype)
    return project_rows(F.softmax(alpha.detach(), dim=-1) + delta)


def adversarial_weights(loss_of: Callable[[list[Tensor]], Tensor], alphas: Sequence[Tensor], bound: float,
                        steps: int, generator: torch.Generator) -> list[Tensor]:
    """SDARTS-ADV: the mixing weights of the weight step chosen to *raise* the training loss,

        w*(alpha) = argmin_w max_{||delta||_inf <= eps} L_train(w, A + delta),

    the inner maximum approximated by projected gradient ascent on ``delta`` (the paper's adversarial
    objective; its attack is PGD on the softmaxed weights): a uniform random start in the ball, then
    ``steps`` steps of ``2 * bound / steps`` along the sign of the gradient, each clipped back into the
    ball, the weights projected onto the simplex (:func:`project_rows`) before every evaluation.
    ``loss_of`` maps the list of mixing weights to the training loss (with the network's weights held
    fixed); ``generator`` (CPU) seeds the random start, so a resumed run attacks the same way.
    """
    clean = [F.softmax(a.detach(), dim=-1) for a in alphas]
    deltas = [((2.0 * torch.rand(c.shape, generator=generator, dtype=torch.float64) - 1.0) * bound)
              .to(device=c.device, dtype=c.dtype) for c in clean]
    step = 2.0 * bound / steps
    for _ in range(steps):
        mixed = [project_rows(c + d).requires_grad_(True) for c, d in zip(clean, deltas)]
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_of(mixed), mixed)
        deltas = [(d + step * g.sign()).clamp(-bound, bound) for d, g in zip(deltas, grads)]
    return [project_rows(c + d) for c, d in zip(clean, deltas)]
