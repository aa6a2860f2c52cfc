"""The dominant eigenvalue of the Hessian of the validation loss with respect to alpha.

R-DARTS (Zela et al., ICLR 2020, "Understanding and Robustifying Differentiable Architecture
Search", section 4) tracks ``lambda_max``, the dominant eigenvalue of ``grad^2_alpha L_val(w, alpha)``,
and finds that its growth goes with poorly generalising cells. We compute it without forming the
Hessian: power iteration ``v <- H v / ||H v||`` on exact Hessian-vector products (a double backward
through ``grad_alpha L_val``, the graph of the gradient built once and reused), with the Rayleigh
quotient ``v . H v`` of the unit vector ``v`` as the estimate. Power iteration converges to the
eigenvalue of largest magnitude; its sign is kept.

Cost: one forward and backward with a graph, then ``iterations`` backward passes through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..ops import lean

ITERATIONS = 20  # power-iteration steps per eigenvalue
Reduce = Callable[[Sequence[Tensor]], list[Tensor]]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum(((x * y).sum() for x, y in zip(a, b)), torch.zeros((), dtype=a[0].dtype, device=a[0].device))


def dominant_eigenvalue(loss: Callable[[], Tensor], alphas: Sequence[Tensor], iterations: int = ITERATIONS,
                        seed: int = 0, reduce: Reduce | None = None) -> float:
    """The eigenvalue of largest magnitude of the Hessian of ``loss()`` with respect to ``alphas``.

    ``seed`` fixes the start vector (a standard normal draw from its own generator, so that no other
    random stream moves); ``reduce`` averages Hessian-vector products over data-parallel processes.
    """
    alphas = list(alphas)
    # A graph differentiated twice must be built from plain operations (ops/lean.py).
    with torch.enable_grad(), lean.plain():
        grads = torch.autograd.grad(loss(), alphas, create_graph=True, allow_unused=True)
    pairs = [(g, a) for g, a in zip(grads, alphas) if g is not None and g.requires_grad]
    if not pairs:
        return 0.0  # the loss is linear in alpha: its Hessian is zero
    grads_used, alphas_used = [g for g, _ in pairs], [a for _, a in pairs]
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(a.shape, generator=gen, dtype=torch.float64).to(device=a.device, dtype=a.dtype)
         for a in alphas_used]
    norm = torch.sqrt(_dot(v, v))
    v = [t / norm for t in v]
    eigenvalue = 0.0
    for _ in range(iterations):
        hv = torch.autograd.grad(grads_used, alphas_used, grad_outputs=v, retain_graph=True, allow_unused=True)
        hv = [torch.zeros_like(a) if h is None else h.detach() for h, a in zip(hv, alphas_used)]
        if reduce is not None:
            hv = reduce(hv)
        eigenvalue = float(_dot(v, hv))  # Rayleigh quotient of the unit vector v
        norm = torch.sqrt(_dot(hv, hv))
        if float(norm) == 0.0:
            return 0.0
        v = [h / norm for h in hv]
    return eigenvalue


@contextlib.contextmanager
def buffers_kept(module: torch.nn.Module) -> Iterator[None]:
    """Restore ``module``'s buffers (batch-norm running statistics) after the block, so that a
    diagnostic forward in training mode leaves the search exactly where it was."""
    saved = {name: b.detach().clone() for name, b in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(saved[name])


def due(every: int, epoch: int) -> bool:
    """Whether ``--hessian_eig_every every`` measures after the (0-based) ``epoch``."""
    return every > 0 and (epoch + 1) % every == 0


def search_eigenvalue(architect: Any, model: torch.nn.Module, batch: Any, seed: int,
                      iterations: int = ITERATIONS) -> float:
    """:func:`dominant_eigenvalue` of ``architect.loss_fn`` on ``batch`` (the search's validation loss)
    in the architect's alphas, the weights held fixed; the model in training mode, as in the alpha
    step, its buffers restored afterwards.

    A DrNAS network (``--dirichlet``) samples its mixing weights in training mode: the measurement
    uses the sample drawn from ``seed``, the same every time, so that epochs compare and no random
    stream of the search moves."""
    params = {**{n: w.detach() for n, w in zip(architect.weight_names, architect.weights)},
              **dict(zip(architect.alpha_names, architect.alphas))}
    was_training = model.training
    sample_seed = getattr(model, "dirichlet_seed", None)
    model.train()
    if hasattr(model, "dirichlet_seed"):
        model.dirichlet_seed = seed
    try:
        with buffers_kept(model):
            return dominant_eigenvalue(lambda: architect.loss_fn(params, batch), architect.alphas, iterations, seed,
                                       architect.reduce)
    finally:
        model.train(was_training)
        if hasattr(model, "dirichlet_seed"):
            model.dirichlet_seed = sample_seed
