"""Matplotlib without pyplot: figures are plain objects, so no GUI backend and no global state."""

from __future__ import annotations

import io
from collections.abc import Callable
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


def frames(fig: Any, changing: Callable[[], list[Any]], dpi: int = 110) -> Callable[[], Any]:
    """``grab() -> PIL image`` of ``fig``'s current state, for the frames of an animation whose layout
    stays the same: the first call draws everything but the artists ``changing()`` names once and
    keeps that picture; every call puts it back and draws only those artists over it (the axes'
    frame, colour bar and fixed labels are not drawn again for every frame). The changing artists must
    keep their place without a full draw (e.g. a title set with an explicit ``y``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    background = None

    def grab() -> Any:
        nonlocal background
        artists = changing()
        if background is None:
            for a in artists:
                a.set_visible(False)
            canvas.draw()
            background = canvas.copy_from_bbox(fig.bbox)
            for a in artists:
                a.set_visible(True)
        canvas.restore_region(background)
        for a in artists:
            fig.draw_artist(a)
        width, height = canvas.get_width_height()
        return Image.frombuffer("RGBA", (width, height), bytes(canvas.buffer_rgba()), "raw", "RGBA", 0, 1).convert("RGB")

    return grab


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    data = figure_bytes(fig, path.suffix.lstrip(".") or "png", dpi)
    atomic_write(path, lambda f: f.write(data))
    return path
