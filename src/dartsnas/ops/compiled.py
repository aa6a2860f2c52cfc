"""Optional ``torch.compile`` of small pure kernels, falling back to plain PyTorch.

A kernel here is a function of tensors (and constants) with no autograd of its own: it runs
inside the forward or backward of a custom autograd Function, where gradients are off. Compiling it
fuses a chain of elementwise operations into one loop (C++ on the CPU, Triton on CUDA), which
removes the passes over memory that dominate the recurrent search cell's non-matrix work.

Compilation is lazy (the first call of each shape family pays for it) and dynamic in the sizes, so
the 1..8 incoming edges of the search cell's nodes and the training and validation batch sizes share
one compiled graph. When compilation fails (no C++ compiler, no Triton, an unsupported operation),
the kernel logs one warning and runs the plain function from then on: the results are the same
within float rounding either way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger("dartsnas")


class Kernel:
    """``fn`` compiled on first use when asked for, else ``fn`` itself; ``label`` names it in warnings."""

    def __init__(self, fn: Callable[..., Any], label: str):
        self.fn = fn
        self.label = label
        self._compiled: Callable[..., Any] | None = None
        self._failed: str | None = None  # why compilation was given up, once it has been
        self._lock = threading.Lock()

    @property
    def failed(self) -> str | None:
        """Why compilation was given up, or None."""
        return self._failed

    @property
    def active(self) -> bool:
        """Whether the compiled version has been built and is in use."""
        return self._compiled is not None and self._failed is None

    def __call__(self, *args: Any, compiled: bool = True) -> Any:
        if not compiled or self._failed is not None:
            return self.fn(*args)
        if self._compiled is None:  # the lock only for the first calls, not on every node of every step
            with self._lock:
                if self._compiled is None:
                    self._compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self._compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any failure of the compiled path falls back to fn
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            self._failed = reason[:300]
            logger.warning("--compile: could not compile %s (%s); running it uncompiled from now on (a C++ compiler "
                           "on the CPU, or Triton on CUDA, is needed; without --compile this warning goes away)",
                           self.label, self._failed)
            # A genuine error of the computation itself is raised again here, by the plain function.
            return self.fn(*args)

    def reset(self) -> None:
        """Forget the compiled version and any failure (tests)."""
        self._compiled = None
        self._failed = None
