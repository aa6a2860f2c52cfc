"""Cutout (DeVries & Taylor 2017), as used for the CIFAR-10 evaluation (paper section A.2)."""

from __future__ import annotations

import torch


def cutout(x: torch.Tensor, length: int, generator: torch.Generator, select: slice | None = None,
           total: int | None = None) -> torch.Tensor:
    """Zero one ``length`` x ``length`` square per image, its centre uniform over the image.

    Squares near the border are clipped rather than moved inside, so a corner may lose only a
    quarter of a square, as in the authors' code (which also makes an odd ``length`` act as
    ``length - 1``). Applied after normalisation, so the hole has the mean colour.

    With several processes, ``x`` is this process's rows ``select`` of a global batch of ``total`` images:
    the squares are drawn for the whole global batch (see :func:`~dartsnas.data.images.augment`).
    """
    B, _, H, W = x.shape
    half = length // 2
    n = B if total is None else total
    cy = torch.randint(0, H, (n, 1), generator=generator, device=generator.device)
    cx = torch.randint(0, W, (n, 1), generator=generator, device=generator.device)
    if select is not None:
        cy, cx = cy[select], cx[select]
    cy, cx = cy.to(x.device), cx.to(x.device)
    rows = torch.arange(H, device=x.device).unsqueeze(0)
    cols = torch.arange(W, device=x.device).unsqueeze(0)
    in_rows = (rows >= cy - half) & (rows < cy + half)  # (B, H)
    in_cols = (cols >= cx - half) & (cols < cx + half)  # (B, W)
    hole = in_rows.unsqueeze(2) & in_cols.unsqueeze(1)  # (B, H, W)
    return x.masked_fill(hole.unsqueeze(1), 0.0)
