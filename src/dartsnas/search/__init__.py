"""The continuous relaxation (search networks) and the bilevel optimiser (architect).

The package is also callable: ``dartsnas.search(...)`` is :func:`dartsnas.api.search`, which runs a
convolutional cell search. (A package and a function cannot share the name ``dartsnas.search``, so
the package's module object forwards calls to the function.)
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from ..api import search

        return search(*args, **kwargs)


# Setting a module's class is the supported way to give it behaviour (Python reference, "Customizing
# module attribute access").
sys.modules[__name__].__class__ = _CallableModule
