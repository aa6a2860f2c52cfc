"""Matplotlib without pyplot: figures are plain objects, so no GUI backend and no global state."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..rundir import atomic_write


def new_figure(figsize: tuple[float, float], constrained: bool = True) -> Any:
    from matplotlib.figure import Figure

    # Figure() draws through the Agg canvas by default: no display needed, nothing registered globally.
    return Figure(figsize=figsize, layout="constrained" if constrained else None)


def palette(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def figure_bytes(fig: Any, fmt: str = "png", dpi: int = 110) -> bytes:
    """The figure drawn into memory, e.g. as one frame of an animation."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, facecolor="white")
    return buf.getvalue()


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    data = figure_bytes(fig, path.suffix.lstrip(".") or "png", dpi)
    atomic_write(path, lambda f: f.write(data))
    return path
