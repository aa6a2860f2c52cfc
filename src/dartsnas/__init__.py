"""dartsnas: Differentiable Architecture Search (Liu, Simonyan & Yang, ICLR 2019) on today's PyTorch."""

from __future__ import annotations

import os as _os
import sys as _sys

if _sys.platform.startswith("linux"):
    # Back PyTorch's large CPU buffers with 2 MB pages: the first touch of each fresh activation
    # buffer then costs about a quarter as much (benchmarks/RESULTS.md). PyTorch reads the variable
    # once, at its first large allocation, so this only takes effect when dartsnas is imported
    # before any big tensor exists. THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"

from .errors import UserError
from .genotype import Genotype, RecurrentGenotype, get_genotype, list_genotypes, load_genotype, parse_printed

__all__ = [
    "Genotype",
    "RecurrentGenotype",
    "UserError",
    "__version__",
    "get_genotype",
    "list_genotypes",
    "load_genotype",
    "parse_printed",
]
