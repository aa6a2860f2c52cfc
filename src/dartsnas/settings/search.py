"""What the convolutional and the recurrent search share: the operation set option and its check, and
the checks of the second-order step, the Hessian eigenvalue and early stopping against ``--sync_bn``,
and what an early-stopping rule needs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..config import check, option
from ..genotype import check_primitives
from ..search.early_stop import Rule, parse_rule


def primitives_option(known: Sequence[str]) -> Any:
    """The ``primitives`` field of a search: the candidate operations of every edge (paper section 2.1)."""
    return option(tuple(known), "operations every edge mixes, comma-separated (a list in YAML), in the order of "
                                "alpha's columns; 'none' lets an edge fade out and is never chosen (default: all: "
                                f"{','.join(known)})", group="search")


def check_search_options(cfg: Any, known: Sequence[str]) -> Rule | None:
    """The shared checks of a search config (``primitives`` against the ``known`` operations, ``unrolled``,
    ``hvp``, ``hvp_r``, ``hvp_check``, ``hessian_eig_every``, ``early_stop``, ``sync_bn``); returns the
    parsed early-stopping rule."""
    check_primitives(cfg.primitives, known)
    check(not (cfg.sync_bn and (cfg.hvp_check or (cfg.unrolled and cfg.hvp == "exact"))),
          "--sync_bn cannot be combined with --hvp exact or --hvp_check (SyncBatchNorm has no double backward); "
          "use --hvp fd")
    check(cfg.hvp_r > 0 and math.isfinite(cfg.hvp_r), f"--hvp_r must be a positive number, got {cfg.hvp_r}")
    check(cfg.hessian_eig_every >= 0, f"--hessian_eig_every must be >= 0, got {cfg.hessian_eig_every}")
    check(not (cfg.sync_bn and cfg.hessian_eig_every), "--sync_bn cannot be combined with --hessian_eig_every "
                                                       "(SyncBatchNorm has no double backward)")
    rule = parse_rule(cfg.early_stop)
    check(rule is None or rule.kind != "eigen" or cfg.hessian_eig_every == 1,
          f"--early_stop {cfg.early_stop} needs the eigenvalue after every epoch: add --hessian_eig_every 1")
    return rule
