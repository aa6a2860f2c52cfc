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


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=dpi, facecolor="white")
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path
