"""What the two searches (convolutional and recurrent) share as jobs of the epoch loop.

Both log the derived cell after each epoch, write its genotype and alphas, may end early by a rule
(:mod:`dartsnas.search.early_stop`), and end by writing the cell that rule chose (or the last one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import distributed
from ..genotype import AnyGenotype
from ..genotype import from_dict as genotype_from_dict
from ..search.early_stop import Tracker, kept_genotype
from .common import finish_search, write_search_epoch
from .loop import Job

logger = logging.getLogger("dartsnas")


@dataclass
class SearchResult:
    run_dir: Path
    genotype: AnyGenotype
    metrics: list[dict[str, Any]]
    selected: AnyGenotype | None = None  # the cell DARTS-PT chose (search cnn --selection pt)


class SearchJob(Job):
    """A search: subclasses set ``self.model`` (with ``genotype()``), ``self.genotype`` (the epoch's
    derived cell, in ``end_epoch``) and ``self.stopper`` (an early-stopping tracker or None)."""

    model: Any
    genotype: AnyGenotype
    stopper: Tracker | None = None

    def stop_reason(self, epoch: int, record: dict[str, Any]) -> str | None:
        return None if self.stopper is None else self.stopper.update(epoch, record)

    def log_epoch(self, record: dict[str, Any], finished: bool) -> None:
        if not finished:  # the last epoch's cell is the final one, printed once at the end
            logger.info("genotype = %s", self.genotype)

    def write_epoch(self, record: dict[str, Any], finished: bool) -> None:
        assert self.rd is not None
        # The record holds the epoch's derived cell: no second derivation, and the same after a resume.
        write_search_epoch(self.rd, self.model, genotype_from_dict(record["genotype"]), record)

    def search_state(self) -> dict[str, Any]:
        """The checkpoint entries every search has besides its optimisers."""
        return {"model": self.model.state_dict(), "genotype": self.genotype.to_dict(),
                "primitives": list(self.model.primitives),
                **({"early_stop": self.stopper.state()} if self.stopper is not None else {})}

    def finish(self, resumed_finished: bool) -> SearchResult:
        assert self.rd is not None
        genotype = kept_genotype(self.model.genotype(), self.stopper)
        if distributed.is_main():
            finish_search(self.rd, genotype, self.model.primitives, self.cfg.plots and not resumed_finished)
        return SearchResult(self.rd.path, genotype, self.rd.read_metrics())
