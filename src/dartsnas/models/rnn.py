"""The recurrent language model that trains a DARTS cell (paper section 3.2, appendix A.2.2).

One recurrent layer whose cell is given by a :class:`RecurrentGenotype`, an embedding tied to the
decoder, and the AWD-LSTM regularisers the paper uses: embedding dropout (whole words), locked
(variational) dropout on the embeddings and the outputs, per-sequence masks on ``x`` and ``h``
inside the cell, and temporal activation regularisation (computed by the training loop from the
raw outputs this model returns).

Parameter names match the authors' released model (``encoder.weight``, ``rnns.0._W0``,
``rnns.0._Ws.k``, ``decoder.weight`` tied to ``encoder.weight``, ``decoder.bias``), so its weights
load directly into :class:`RNNModel`.

Every dropout mask is drawn from an optional ``torch.Generator``: the search draws the masks of a
batch from a per-batch seed, so that all evaluations of one batch inside an alpha step (the
virtual step, ``w+`` and ``w-`` of the finite difference) see the same function of the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..genotype import RecurrentGenotype
from ..ops.sequence import sequence_product

# Initialisation range of every weight (the authors' code, rnn/model.py ``INITRANGE``).
INIT_RANGE = 0.04

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


def dropout_mask(shape: tuple[int, ...], p: float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """A Bernoulli(1 - p) mask scaled by 1 / (1 - p) (inverted dropout)."""
    keep = 1.0 - p
    probs = torch.full(shape, keep, dtype=like.dtype, device=like.device)
    return torch.bernoulli(probs, generator=generator).div_(keep)


def embedded_dropout(weight: Tensor, words: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Look ``words`` up in ``weight`` with whole rows (words) dropped with probability ``p``."""
    if p:
        weight = weight * dropout_mask((weight.shape[0], 1), p, weight, generator)
    return F.embedding(words, weight)


class LockedDropout(nn.Module):
    """Variational dropout: one mask per sequence, shared by every time step of (T, B, D) input."""

    def forward(self, x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
        if not self.training or not p:
            return x
        return x * dropout_mask((1, x.shape[1], x.shape[2]), p, x, generator)


class DARTSCell(nn.Module):
    """A recurrent cell from a genotype (paper section 2.1; the authors' code, rnn/model.py ``DARTSCell``).

    ``[c0, h0] = [x_t, h_{t-1}] W0``, ``s0 = h_{t-1} + sigmoid(c0) * (tanh(h0) - h_{t-1})``; node
    ``k+1`` with predecessor ``j`` and activation ``f``: ``[c, h] = s_j W_k``,
    ``s = s_j + sigmoid(c) * (f(h) - s_j)``; ``h_t`` is the mean of the ``concat`` nodes.
    """

    def __init__(self, ninp: int, nhid: int, dropouth: float, dropoutx: float, genotype: RecurrentGenotype | None,
                 steps: int | None = None, packed: bool = False):
        super().__init__()
        self.ninp, self.nhid = ninp, nhid
        # Products with each weight packed once per sequence and its gradient gathered into one
        # product (ops/sequence.py); not for graphs that are differentiated twice.
        self.packed = packed
        self.dropouth, self.dropoutx = dropouth, dropoutx
        self.genotype = genotype
        steps = genotype.steps if genotype is not None else steps
        assert steps is not None
        self.steps = steps
        self._W0 = nn.Parameter(torch.empty(ninp + nhid, 2 * nhid).uniform_(-INIT_RANGE, INIT_RANGE))
        self._Ws = nn.ParameterList(
            [nn.Parameter(torch.empty(nhid, 2 * nhid).uniform_(-INIT_RANGE, INIT_RANGE)) for _ in range(steps)]
        )
        if genotype is not None:
            # Nodes that read the same predecessor share one matrix product per time step.
            groups: dict[int, list[int]] = {}
            for k, (_, pred) in enumerate(genotype.recurrent):
                groups.setdefault(pred, []).append(k)
            self._groups = groups

    def forward(self, inputs: Tensor, hidden: Tensor, generator: torch.Generator | None = None,
                **cell_kwargs: Tensor) -> tuple[Tensor, Tensor]:
        """Run the cell over ``inputs`` (T, B, ninp) from ``hidden`` (B, nhid).

        Returns:
            the hidden state of every step (T, B, nhid) and the last one (B, nhid).
        """
        T, B = inputs.shape[0], inputs.shape[1]
        h_mask = None
        if self.training:
            # One mask per sequence for x and for h (variational dropout; the authors' code, rnn/model.py
            # ``DARTSCell.forward``), drawn x first, then h.
            x_mask = dropout_mask((B, self.ninp), self.dropoutx, inputs, generator)
            h_mask = dropout_mask((B, self.nhid), self.dropouth, inputs, generator)
            inputs = inputs * x_mask
        # [x, h] W0 = x W0[:ninp] + h W0[ninp:]: the input half for all steps in one product.
        x_proj = (inputs.reshape(T * B, self.ninp) @ self._W0[: self.ninp]).view(T, B, 2 * self.nhid)
        w_h = self._W0[self.ninp:]
        project_h = sequence_product(w_h) if self.packed else None
        ctx = self._prepare(**cell_kwargs)
        outputs = []
        # unbind, not x_proj[t]: the backward of each indexing would zero-fill a whole (T, B, 2H) copy.
        for t, x_t in enumerate(x_proj.unbind(0)):
            h_in = hidden if h_mask is None else hidden * h_mask
            pre = torch.addmm(x_t, h_in, w_h) if project_h is None else x_t + project_h(h_in)
            c0, h0 = pre.chunk(2, dim=-1)
            s0 = hidden + torch.sigmoid(c0) * (torch.tanh(h0) - hidden)
            hidden = self._nodes(s0, h_mask, ctx)
            outputs.append(hidden)
        return torch.stack(outputs), hidden

    def _prepare(self, **cell_kwargs: Tensor) -> dict[int, Callable[[Tensor], Tensor]]:
        # The product with the concatenated weights of each predecessor group, built once per sequence.
        products = {}
        for pred, ks in self._groups.items():
            w = self._Ws[ks[0]] if len(ks) == 1 else torch.cat([self._Ws[k] for k in ks], dim=1)
            products[pred] = sequence_product(w) if self.packed else (lambda x, w=w: x @ w)
        return products

    def _nodes(self, s0: Tensor, h_mask: Tensor | None, weights: dict[int, Callable[[Tensor], Tensor]]) -> Tensor:
        assert self.genotype is not None
        H = self.nhid
        states = [s0]
        pending: dict[int, Tensor] = {}  # node -> its [c, h] pre-activation
        for k, (name, pred) in enumerate(self.genotype.recurrent):
            if k not in pending:
                s_pred = states[pred]
                ch = weights[pred](s_pred if h_mask is None else s_pred * h_mask)
                # split, not slicing: the backward of each slice would zero-fill a whole copy of ch.
                for node, part in zip(self._groups[pred], ch.split(2 * H, dim=1)):
                    pending[node] = part
            c, h = pending.pop(k).chunk(2, dim=-1)
            s_prev = states[pred]
            states.append(s_prev + torch.sigmoid(c) * (ACTIVATIONS[name](h) - s_prev))
        concat = self.genotype.concat
        out = states[concat[0]]
        for i in concat[1:]:
            out = out + states[i]
        return out / len(concat)


class RNNOutput(NamedTuple):
    logits: Tensor  # (T, B, ntoken)
    hidden: Tensor  # (B, nhid), the state after the last step
    raw_output: Tensor  # (T, B, nhid), cell outputs before the output dropout (for TAR)


class RNNModel(nn.Module):
    """Embedding -> one recurrent cell -> locked dropout -> tied linear decoder."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nhidlast: int | None = None, dropout: float = 0.75,
                 dropouth: float = 0.25, dropoutx: float = 0.75, dropouti: float = 0.2, dropoute: float = 0.1,
                 genotype: RecurrentGenotype | None = None, cell: nn.Module | None = None, packed: bool = False):
        super().__init__()
        nhidlast = nhid if nhidlast is None else nhidlast
        if not ninp == nhid == nhidlast:
            # Tied weights: the decoder reads nhid-dim outputs with the ninp-dim embedding matrix.
            raise ValueError(f"emsize, nhid and nhidlast must be equal (tied weights), got {ninp}, {nhid}, {nhidlast}")
        self.ntoken, self.ninp, self.nhid, self.nhidlast = ntoken, ninp, nhid, nhidlast
        self.dropout, self.dropouti, self.dropoute = dropout, dropouti, dropoute
        self.lockdrop = LockedDropout()
        self.encoder = nn.Embedding(ntoken, ninp)
        if cell is None:
            if genotype is None:
                raise ValueError("RNNModel needs a genotype (or a cell)")
            cell = DARTSCell(ninp, nhid, dropouth, dropoutx, genotype, packed=packed)
        self.rnns = nn.ModuleList([cell])
        self.decoder = nn.Linear(ninp, ntoken)
        self.decoder.weight = self.encoder.weight  # tied (Press & Wolf 2017; the authors' rnn/model.py)
        nn.init.uniform_(self.encoder.weight, -INIT_RANGE, INIT_RANGE)
        nn.init.zeros_(self.decoder.bias)

    def _cell_kwargs(self) -> dict[str, Tensor]:
        return {}

    def forward(self, input: Tensor, hidden: Tensor, generator: torch.Generator | None = None) -> RNNOutput:
        """``input`` (T, B) token ids, ``hidden`` (B, nhid)."""
        emb = embedded_dropout(self.encoder.weight, input, self.dropoute if self.training else 0.0, generator)
        emb = self.lockdrop(emb, self.dropouti, generator)
        raw_output, hidden = self.rnns[0](emb, hidden, generator, **self._cell_kwargs())
        output = self.lockdrop(raw_output, self.dropout, generator)
        return RNNOutput(self.decoder(output), hidden, raw_output)

    def init_hidden(self, bsz: int) -> Tensor:
        w = self.encoder.weight
        return torch.zeros(bsz, self.nhid, dtype=w.dtype, device=w.device)


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each (the tied decoder weight is the embedding)."""
    return sum(p.numel() for p in model.parameters())
