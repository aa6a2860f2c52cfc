"""The architecture step of the bilevel optimisation (paper section 2.3).

``min_alpha L_val(w*(alpha), alpha)`` with ``w*`` approximated by one virtual weight step:

* first order (``unrolled=False``): ``grad_alpha L_val(w, alpha)`` (paper eq. 6 with xi = 0);
* second order (``unrolled=True``): with ``w' = w - xi * (momentum * buf + c * grad_w L_train(w, alpha)
  + wd * w)`` (the weight optimiser's own update, ``c`` = clip coefficient for the recurrent search),

      grad = grad_alpha L_val(w', alpha) - xi * c * H v,   v = grad_w' L_val(w', alpha),
      H v  = grad^2_{alpha, w} L_train(w, alpha) v                              (paper eq. 6-8)

  ``H v`` comes either from the paper's central finite difference (eq. 8, ``hvp='fd'``,
  ``eps = r / ||v||``) or from an exact double backward (``hvp='exact'``).

Everything is computed with functional calls on parameter tensors: no network is rebuilt or
deep-copied, and the weights are never perturbed in place (so they cannot drift).

The architect is generic over the model: it only needs the named weights, the named alphas and a
``loss_fn(params, batch) -> scalar`` that evaluates the model with ``params`` substituted (see
:func:`torch.func.functional_call`). The CNN and the recurrent search share it.

Data parallel (several processes, each with a slice of both batches): ``reduce`` averages a list of
gradients over the processes. It is applied wherever a gradient is *used*, so that every process
computes the same step from the global batch: the training gradient before the virtual step (and
its clip coefficient), the validation gradients at ``w'`` (``dalpha`` and ``v``, before ``v`` is
clipped and before ``eps = r / ||v||``), and ``H v``. Each of these is a mean over the batch, so the
mean of the per-process values is the global value (equal slices).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..ops import lean

LossFn = Callable[[dict[str, Tensor], Any], Tensor]
Reduce = Callable[[Sequence[Tensor]], list[Tensor]]


@dataclass(frozen=True)
class VirtualStep:
    """How the weight optimiser would move the weights, mirrored by the virtual step.

    Attributes:
        momentum: SGD momentum (0 for the recurrent search, whose virtual step is plain SGD).
        weight_decay: L2 coefficient added to the gradient.
        clip: when set, the training gradient is clipped to this norm (coefficient ``c``), ``v`` is
            clipped to it too, and the implicit term is scaled by ``c`` (recurrent search; the authors'
            code, rnn/architect.py ``_backward_step_unrolled``; docs/rnn.md says where we differ).
    """

    momentum: float = 0.9
    weight_decay: float = 3e-4
    clip: float | None = None


def call_with(model: nn.Module, params: dict[str, Tensor], args: tuple[Any, ...],
              kwargs: dict[str, Any] | None = None) -> Any:
    """``functional_call(model, params, args, kwargs)``, or the model called directly when every tensor of
    ``params`` is already the model's own under that name (the first-order alpha step's alphas, the
    virtual step's weights): the substitution would change nothing, and walking the module tree for it
    takes tens of milliseconds on a search network."""
    for name, tensor in params.items():
        owner, _, attr = name.rpartition(".")
        try:
            own = getattr(model.get_submodule(owner), attr) if owner else getattr(model, attr)
        except AttributeError:
            own = None
        if own is not tensor:
            return functional_call(model, params, args, kwargs)
    return model(*args, **(kwargs or {}))


def _flat_norm(tensors: Sequence[Tensor]) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def _clip_coef(tensors: Sequence[Tensor], max_norm: float) -> float:
    # Same coefficient as torch.nn.utils.clip_grad_norm_ (with its 1e-6), never above 1.
    norm = float(_flat_norm(tensors))
    return min(1.0, max_norm / (norm + 1e-6))


@contextlib.contextmanager
def frozen(params: Sequence[Tensor]) -> Iterator[None]:
    """Parameters that need no gradient for the duration (their flags restored afterwards)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _grads(loss: Tensor, inputs: Sequence[Tensor], create_graph: bool = False) -> list[Tensor]:
    grads = torch.autograd.grad(loss, list(inputs), create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def cosine(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    fa = torch.cat([t.reshape(-1) for t in a]).double()
    fb = torch.cat([t.reshape(-1) for t in b]).double()
    denom = fa.norm() * fb.norm()
    return float(fa @ fb / denom) if denom > 0 else float("nan")


class Architect:
    """Computes alpha gradients and applies the alpha optimiser.

    Args:
        weights: the network weights by name (``named_parameters`` without the alphas).
        alphas: the architecture parameters by name.
        loss_fn: ``loss_fn(params, batch)``: the loss of the model evaluated with ``params`` (a
            dict of weights and alphas by name, possibly substituted tensors; the model's own for
            names it leaves out) on ``batch``.
        arch_optimizer: the optimiser of the alphas (Adam in the paper).
        weight_optimizer: the weights' optimiser, whose momentum buffers the virtual step uses.
        unrolled: second order when True.
        hvp: 'fd' (paper) or 'exact' Hessian-vector product.
        hvp_r: ``eps = hvp_r / ||v||`` for the finite difference.
        virtual: the virtual step's momentum, weight decay and clipping.
        reduce: averages a list of gradients over data-parallel processes (None: one process).
    """

    def __init__(self, weights: dict[str, Tensor], alphas: dict[str, Tensor], loss_fn: LossFn,
                 arch_optimizer: torch.optim.Optimizer | None, weight_optimizer: torch.optim.Optimizer | None = None,
                 unrolled: bool = False, hvp: str = "fd", hvp_r: float = 0.01,
                 virtual: VirtualStep = VirtualStep(), reduce: Reduce | None = None):
        if hvp not in ("fd", "exact"):
            raise ValueError(f"hvp must be 'fd' or 'exact', got {hvp!r}")
        self.weight_names = list(weights)
        self.weights = [weights[n] for n in self.weight_names]
        self.alpha_names = list(alphas)
        self.alphas = [alphas[n] for n in self.alpha_names]
        self.loss_fn = loss_fn
        self.arch_optimizer = arch_optimizer
        self.weight_optimizer = weight_optimizer
        self.unrolled = unrolled
        self.hvp = hvp
        self.hvp_r = hvp_r
        self.virtual = virtual
        self.reduce = reduce
        # An extra term of the alpha objective that depends on alpha alone (beta-DARTS' Beta-Decay,
        # search/beta_decay.py; DrNAS' KL anchor, search/dirichlet.py): its gradient is added to the
        # first- or second-order gradient (it does not enter the virtual weight step).
        self.alpha_penalty: Callable[[list[Tensor]], Tensor] | None = None

    # -- helpers -------------------------------------------------------------------------------
    def _params(self, weights: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        ws = self.weights if weights is None else weights
        return {**dict(zip(self.weight_names, ws)), **dict(zip(self.alpha_names, self.alphas))}

    def _reduce(self, grads: list[Tensor]) -> list[Tensor]:
        return grads if self.reduce is None else self.reduce(grads)

    def _momentum_buffers(self) -> list[Tensor | None]:
        if self.weight_optimizer is None or self.virtual.momentum == 0:
            return [None] * len(self.weights)
        state = self.weight_optimizer.state
        return [state[w].get("momentum_buffer") if w in state else None for w in self.weights]

    # -- gradients -----------------------------------------------------------------------------
    def first_order_grad(self, valid_batch: Any) -> list[Tensor]:
        """``grad_alpha L_val(w, alpha)``; autograd computes no weight gradient on the way."""
        # The weights frozen in place (custom backwards, ops/fastconv.py, see that no weight gradient is
        # wanted) and only the alphas substituted: substituting hundreds of detached weights by name
        # costs a few ms a step. Frozen through the backward too: a checkpointed cell recomputed there
        # must build the forward's graph (--checkpoint_cells).
        with frozen(self.weights):
            loss = self.loss_fn(dict(zip(self.alpha_names, self.alphas)), valid_batch)
            grads = _grads(loss, self.alphas)
        return self._reduce(grads)

    def virtual_weights(self, train_batch: Any, lr: float, create_graph: bool = False
                        ) -> tuple[list[Tensor], float, list[Tensor] | None]:
        """``w'`` of the virtual step, the clip coefficient ``c`` and (with ``create_graph``) the
        training gradient with its graph, reusable for an exact Hessian-vector product."""
        # A graph differentiated twice must be built from plain operations (ops/lean.py).
        with torch.enable_grad(), (lean.plain() if create_graph else contextlib.nullcontext()):
            loss = self.loss_fn(self._params(), train_batch)
            g_graph = _grads(loss, self.weights, create_graph=create_graph)
        g = self._reduce([t.detach() for t in g_graph])
        c = _clip_coef(g, self.virtual.clip) if self.virtual.clip is not None else 1.0
        mom, wd = self.virtual.momentum, self.virtual.weight_decay
        new = []
        with torch.no_grad():
            for w, gi, buf in zip(self.weights, g, self._momentum_buffers()):
                d = gi * c + wd * w
                if buf is not None:
                    d = d + mom * buf
                new.append((w - lr * d).detach().requires_grad_(True))
        return new, c, (g_graph if create_graph else None)

    def _valid_grads_at(self, w_prime: list[Tensor], valid_batch: Any) -> tuple[list[Tensor], list[Tensor]]:
        loss = self.loss_fn(self._params(w_prime), valid_batch)
        grads = self._reduce(_grads(loss, self.alphas + w_prime))
        dalpha, v = grads[: len(self.alphas)], grads[len(self.alphas):]
        if self.virtual.clip is not None:
            coef = _clip_coef(v, self.virtual.clip)
            v = [t * coef for t in v]
        return dalpha, v

    def hvp_fd(self, v: Sequence[Tensor], train_batch: Any, r: float | None = None) -> list[Tensor]:
        """Central difference of ``grad_alpha L_train`` along ``v`` (paper eq. 8)."""
        r = self.hvp_r if r is None else r
        norm = float(_flat_norm(v))
        if norm == 0.0 or not math.isfinite(norm):
            return [torch.zeros_like(a) for a in self.alphas]
        eps = r / norm
        with torch.no_grad():
            w_plus = [w + eps * vi for w, vi in zip(self.weights, v)]
            w_minus = [w - eps * vi for w, vi in zip(self.weights, v)]
        g_plus = _grads(self.loss_fn(self._params(w_plus), train_batch), self.alphas)
        g_minus = _grads(self.loss_fn(self._params(w_minus), train_batch), self.alphas)
        return self._reduce([(gp - gm) / (2 * eps) for gp, gm in zip(g_plus, g_minus)])

    def hvp_exact(self, v: Sequence[Tensor], train_batch: Any, g_graph: Sequence[Tensor] | None = None
                  ) -> list[Tensor]:
        """``d/d alpha (grad_w L_train(w, alpha) . v)`` by double backward."""
        if g_graph is None:
            with lean.plain():
                loss = self.loss_fn(self._params(), train_batch)
            g_graph = _grads(loss, self.weights, create_graph=True)
        pairs = [(g, vi) for g, vi in zip(g_graph, v) if g.requires_grad]
        if not pairs:
            return [torch.zeros_like(a) for a in self.alphas]
        hv = torch.autograd.grad([g for g, _ in pairs], self.alphas, grad_outputs=[vi for _, vi in pairs],
                                 allow_unused=True)
        return self._reduce([torch.zeros_like(a) if h is None else h for h, a in zip(hv, self.alphas)])

    def unrolled_grad(self, train_batch: Any, valid_batch: Any, lr: float, hvp: str | None = None) -> list[Tensor]:
        """The second-order alpha gradient (paper eq. 7)."""
        hvp = self.hvp if hvp is None else hvp
        exact = hvp == "exact"
        w_prime, c, g_graph = self.virtual_weights(train_batch, lr, create_graph=exact)
        dalpha, v = self._valid_grads_at(w_prime, valid_batch)
        hv = self.hvp_exact(v, train_batch, g_graph) if exact else self.hvp_fd(v, train_batch)
        return [da - (lr * c) * h for da, h in zip(dalpha, hv)]

    def hvp_agreement(self, train_batch: Any, valid_batch: Any, lr: float) -> dict[str, float]:
        """Cosine between the finite-difference and the exact ``H v`` on one batch pair, and the
        size of the implicit term relative to the whole gradient (paper eq. 7 and 8)."""
        w_prime, c, g_graph = self.virtual_weights(train_batch, lr, create_graph=True)
        dalpha, v = self._valid_grads_at(w_prime, valid_batch)
        exact = self.hvp_exact(v, train_batch, g_graph)
        fd = self.hvp_fd(v, train_batch)
        implicit = [(lr * c) * h for h in exact]
        total = [da - i for da, i in zip(dalpha, implicit)]
        return {
            "hvp_cosine": cosine(fd, exact),
            "implicit_ratio": float(_flat_norm(implicit) / _flat_norm(total).clamp_min(1e-30)),
        }

    # -- the step ------------------------------------------------------------------------------
    def penalty_grad(self) -> list[Tensor]:
        """``grad_alpha`` of :attr:`alpha_penalty` (the same on every process: no reduction)."""
        assert self.alpha_penalty is not None
        with torch.enable_grad():
            return _grads(self.alpha_penalty(self.alphas), self.alphas)

    def grad(self, train_batch: Any, valid_batch: Any, lr: float) -> list[Tensor]:
        if self.unrolled:
            grads = self.unrolled_grad(train_batch, valid_batch, lr)
        else:
            grads = self.first_order_grad(valid_batch)
        if self.alpha_penalty is not None:
            grads = [g + p for g, p in zip(grads, self.penalty_grad())]
        return grads

    def step(self, train_batch: Any, valid_batch: Any, lr: float) -> None:
        """One alpha update; leaves every weight's ``.grad`` untouched."""
        assert self.arch_optimizer is not None
        grads = self.grad(train_batch, valid_batch, lr)
        self.arch_optimizer.zero_grad(set_to_none=True)
        for a, g in zip(self.alphas, grads):
            a.grad = g.detach()
        self.arch_optimizer.step()
