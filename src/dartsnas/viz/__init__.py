"""Pictures of architectures and runs: cell diagrams, search animations, learning curves, HTML report.

Importing this package is cheap: matplotlib and Pillow are imported inside the functions
that draw, so that ``import dartsnas`` and the command line stay fast and work without them.

Engines call :func:`finalize_run` at the end of a run; it never raises.
"""

from __future__ import annotations

from .cells import cell_graph, cell_names, dot_problem, to_dot, write_cell_diagrams
from .curves import aggregate, plot_curves
from .report import finalize_run, render_report, write_report, write_run_figures
from .search import (
    load_history,
    plot_search,
    progress_frames,
    write_alpha_figures,
    write_alpha_heatmaps,
    write_diagnostics_figure,
    write_progress_gifs,
)

__all__ = [
    "aggregate",
    "cell_graph",
    "cell_names",
    "dot_problem",
    "finalize_run",
    "load_history",
    "plot_curves",
    "plot_search",
    "progress_frames",
    "render_report",
    "to_dot",
    "write_alpha_figures",
    "write_alpha_heatmaps",
    "write_cell_diagrams",
    "write_diagnostics_figure",
    "write_progress_gifs",
    "write_report",
    "write_run_figures",
]
