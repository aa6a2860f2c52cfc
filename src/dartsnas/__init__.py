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
    "create_model",
    "get_genotype",
    "list_genotypes",
    "load_genotype",
    "load_model",
    "parse_printed",
]


def __getattr__(name: str):
    # The model factory imports torch; loading it lazily keeps `import dartsnas` (and the command
    # line's help) fast.
    if name in ("create_model", "load_model"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dartsnas' has no attribute {name!r}")
