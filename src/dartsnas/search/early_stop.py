"""When a search stops early, and which cell it keeps.

Two rules, given as ``--early_stop SPEC``:

* ``skip:N`` (DARTS+, Liang et al., arXiv:1909.06035, section 3, "Criterion 1"): stop as soon as
  the normal cell derived after an epoch holds N or more skip connections (the paper uses N = 2);
  the cell kept is the one of that epoch, the cell at stopping.
* ``eigen:RATIO[:K]`` (R-DARTS, Zela et al., ICLR 2020, section 4, the early-stopping variant
  DARTS-ES): with ``lambda(i)`` the dominant eigenvalue of the alpha Hessian of the validation loss
  after epoch i and ``avg(i)`` its mean over the last K epochs (fewer at the start), stop after
  epoch i when ``avg(i) / avg(i - K) > RATIO``: the paper's test ``avg(i - K) / avg(i) < T`` with
  ``T = 1 / RATIO`` (the paper: T = 0.75, k = 5, i.e. eigen:1.33:5; the authors' code defaults to a
  growth factor of 1.3 over local averages of 5 eigenvalues). The cell kept is the one of epoch
  ``i - K``, from before the curvature grew. K defaults to 5. Our averages trail (they use what is
  known after epoch i); the authors' code centres them, so its test runs two measurements late, and
  it does not test before epoch 10; neither is done here.

:class:`Tracker` keeps the per-epoch history a rule needs; its :meth:`Tracker.state` goes into the
checkpoint, so a resumed run decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..genotype import AnyGenotype, from_dict

logger = logging.getLogger("dartsnas")

EIGEN_WINDOW = 5  # R-DARTS section 4 (DARTS-ES): k = 5 epochs


@dataclass(frozen=True)
class Rule:
    """A parsed ``--early_stop`` spec."""

    kind: str  # "skip" or "eigen"
    skips: int = 0  # skip:N
    ratio: float = 0.0  # eigen:RATIO
    window: int = EIGEN_WINDOW  # eigen:RATIO:K

    def __str__(self) -> str:
        return f"skip:{self.skips}" if self.kind == "skip" else f"eigen:{self.ratio:g}:{self.window}"


def parse_rule(spec: str | None) -> Rule | None:
    """``skip:N`` or ``eigen:RATIO[:K]``; None or an empty spec: no early stopping."""
    if spec is None or not spec.strip():
        return None
    kind, _, rest = spec.strip().partition(":")
    parts = rest.split(":") if rest else []
    if kind == "skip" and len(parts) == 1:
        n = _number(parts[0], int, spec, "N")
        if n < 1:
            raise UserError(f"--early_stop {spec}: N must be at least 1 (the paper stops at skip:2)")
        return Rule("skip", skips=n)
    if kind == "eigen" and len(parts) in (1, 2):
        ratio = _number(parts[0], float, spec, "RATIO")
        if not (math.isfinite(ratio) and ratio > 1.0):
            raise UserError(f"--early_stop {spec}: RATIO must be a number above 1 (the growth that stops the "
                            f"search; the paper's 1/0.75 = 1.33)")
        window = _number(parts[1], int, spec, "K") if len(parts) == 2 else EIGEN_WINDOW
        if window < 1:
            raise UserError(f"--early_stop {spec}: K must be at least 1 epoch")
        return Rule("eigen", ratio=ratio, window=window)
    raise UserError(f"--early_stop {spec!r} is not a rule; use skip:N (e.g. skip:2) or eigen:RATIO[:K] "
                    f"(e.g. eigen:1.3 or eigen:1.3:5)")


def _number(text: str, kind: type, spec: str, name: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"--early_stop {spec}: {name} must be {'an integer' if kind is int else 'a number'}, "
                        f"got {text!r}") from None


def normal_skips(genotype: dict[str, Any]) -> int:
    """Skip connections among the normal cell's edges (a genotype's JSON dictionary)."""
    return sum(1 for op, _ in genotype["normal"] if op == "skip_connect")


def skip_decision(rule: Rule, genotype: dict[str, Any]) -> str | None:
    """DARTS+ criterion 1 on the cell derived after an epoch."""
    count = normal_skips(genotype)
    if count >= rule.skips:
        return f"the normal cell has {count} skip connections (early stop at {rule.skips}, DARTS+)"
    return None


def local_average(eigenvalues: list[float], i: int, window: int) -> float:
    """Mean of the eigenvalues of epochs ``i - window + 1 .. i`` (0-based, clipped at the start)."""
    part = eigenvalues[max(0, i - window + 1): i + 1]
    return sum(part) / len(part)


def eigen_decision(rule: Rule, eigenvalues: list[float]) -> int | None:
    """The R-DARTS test after the last epoch of ``eigenvalues`` (one per epoch, in order): the index of
    the epoch whose cell to keep (``i - K``) when the search should stop, else None."""
    i = len(eigenvalues) - 1
    k = rule.window
    if i - k < 0:
        return None
    before, now = local_average(eigenvalues, i - k, k), local_average(eigenvalues, i, k)
    if before <= 0.0:
        return None  # no growth ratio of a non-positive curvature
    return i - k if now / before > rule.ratio else None


@dataclass
class Tracker:
    """The history a rule needs and the cell it chose; all of it goes into the checkpoint."""

    rule: Rule
    eigenvalues: list[float] = field(default_factory=list)
    genotypes: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, Any] | None = None  # {"epoch": n (1-based), "genotype": {...}} once stopped

    def update(self, epoch: int, record: dict[str, Any]) -> str | None:
        """Add epoch ``epoch``'s (0-based) record; returns why the search stops after it, or None."""
        genotype = record["genotype"]
        if self.rule.kind == "skip":
            reason = skip_decision(self.rule, genotype)
            if reason is not None:
                self.chosen = {"epoch": epoch + 1, "genotype": genotype}
            return reason
        self.eigenvalues.append(float(record["hessian_eig"]))
        self.genotypes.append(genotype)
        kept = eigen_decision(self.rule, self.eigenvalues)
        if kept is None:
            return None
        # Positions are epochs: the rule needs an eigenvalue after every epoch from the first.
        self.chosen = {"epoch": kept + 1, "genotype": self.genotypes[kept]}
        k, now = self.rule.window, len(self.eigenvalues) - 1
        growth = local_average(self.eigenvalues, now, k) / local_average(self.eigenvalues, kept, k)
        return (f"the dominant Hessian eigenvalue grew {growth:.3g}x over {k} epoch(s) (early stop above "
                f"{self.rule.ratio:g}, R-DARTS); keeping the cell of epoch {kept + 1}")

    def state(self) -> dict[str, Any]:
        return {"eigenvalues": list(self.eigenvalues), "genotypes": list(self.genotypes), "chosen": self.chosen}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state:
            self.eigenvalues = list(state["eigenvalues"])
            self.genotypes = list(state["genotypes"])
            self.chosen = state["chosen"]


def kept_genotype(current: AnyGenotype, tracker: Tracker | None) -> AnyGenotype:
    """The cell a search writes as genotype.json: the one its early-stopping rule chose, else ``current``."""
    if tracker is None or tracker.chosen is None:
        return current
    logger.info("early stopping: genotype.json is the cell of epoch %d", tracker.chosen["epoch"])
    return from_dict(tracker.chosen["genotype"])
