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
    "search",
    "train",
]


def __getattr__(name: str):
    # The model factory and the runs import torch; loading them lazily keeps `import dartsnas` (and the
    # command line's help) fast.
    if name == "search":
        # The subpackage of the search algorithms, which forwards calls to api.search (see its docstring).
        import importlib

        return importlib.import_module(".search", __name__)
    if name in ("create_model", "load_model", "train"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dartsnas' has no attribute {name!r}")
