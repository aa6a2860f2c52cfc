"""dartsnas: Differentiable Architecture Search (Liu, Simonyan & Yang, ICLR 2019) on today's PyTorch."""

from __future__ import annotations

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
