"""``dartsnas plot cell|search|curves`` and ``dartsnas report``: pictures of architectures and runs.

Every command prints the files it wrote, one per line.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .errors import UserError
from .genotype import load_genotype

_FORMATS = ("svg", "png", "pdf", "dot")


def _print_files(files: list[Path]) -> None:
    for f in files:
        print(f)


def _cell(args: argparse.Namespace) -> int:
    from .viz.cells import cell_names, fallback_message, write_cell_diagram, write_cell_diagrams

    genotype = load_genotype(args.arch)
    out = Path(args.output) if args.output else None
    fmt = args.format
    if out is not None and out.suffix.lstrip(".") in _FORMATS:
        if fmt is None:
            fmt = out.suffix.lstrip(".")
        out = out.with_suffix("")
    fmt = fmt or "svg"
    if args.cell is not None and out is not None:
        # One cell and a file name: write exactly that file.
        files = [write_cell_diagram(genotype, args.cell, Path(f"{out}.{fmt}"))]
    else:
        if out is None:
            # A name becomes the file name (DARTS_V2_normal.svg); files, strings and runs give cell_*.svg.
            name = str(args.arch).strip()
            out = Path(name if re.fullmatch(r"\w+", name) and not Path(name).exists() else "cell")
        cells = cell_names(genotype) if args.cell is None else (args.cell,)
        files = write_cell_diagrams(genotype, out, fmt, cells)
    _print_files(files)
    message = fallback_message(files) if fmt != "dot" else None
    if message:
        print(message)
    return 0


def _search(args: argparse.Namespace) -> int:
    from .viz.cells import INSTALL_GRAPHVIZ, dot_problem
    from .viz.search import plot_search

    files = plot_search(args.run_dir, args.output)
    _print_files(files)
    problem = dot_problem()
    if problem:
        print(f"{problem}, so the cell animations were not drawn; {INSTALL_GRAPHVIZ} and run this again")
    return 0


def _curves(args: argparse.Namespace) -> int:
    from .viz.curves import plot_curves

    out = Path(args.output) if args.output else None
    if out is None:
        out = Path(args.run_dirs[0]) / "figures" / "curves.png" if len(args.run_dirs) == 1 else Path("curves.png")
    if out.suffix.lstrip(".") not in ("png", "svg", "pdf"):
        raise UserError(f"-o {out}: the file name must end in .png, .svg or .pdf")
    metrics = args.metrics.split(",") if args.metrics else None
    _print_files([plot_curves(args.run_dirs, out, metrics=metrics, spread=args.spread, title=args.title)])
    return 0


def _report(args: argparse.Namespace) -> int:
    from .viz.report import write_report

    path = write_report(args.run_dir, args.output)
    print(path)
    return 0


def add_cli(groups: dict[str, argparse._SubParsersAction], commands: argparse._SubParsersAction) -> None:
    plot = groups["plot"]
    p = plot.add_parser(
        "cell", help="draw the cells of an architecture (Graphviz)",
        description="Draw the normal and reduction cells (or the recurrent cell) of an architecture in the "
                    "paper's style. Without the Graphviz 'dot' program the DOT source is written instead.",
    )
    p.add_argument("arch", metavar="ARCH", help="a name (DARTS_V2), genotype.json, run directory or 'Genotype(...)'")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="output path; per-cell suffixes are added (FILE_normal.svg, FILE_reduce.svg) unless "
                        "--cell picks one (default: NAME_<cell>.svg or cell_<cell>.svg here)")
    p.add_argument("--format", choices=_FORMATS, help="file format (default: from -o, else svg)")
    p.add_argument("--cell", choices=("normal", "reduce", "recurrent"), help="draw only this cell")
    p.set_defaults(handler=_cell)

    p = plot.add_parser(
        "search", help="animate a search run and plot its alphas and curves",
        description="From a search run directory: a GIF per cell type of the most likely cell after each "
                    "epoch, a figure of every edge's softmaxed alpha over the epochs, and the search's loss "
                    "and accuracy curves.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a search run directory")
    p.add_argument("-o", "--output", metavar="DIR", help="output folder (default: RUN_DIR/figures)")
    p.set_defaults(handler=_search)

    p = plot.add_parser(
        "curves", help="learning curves of one or more runs (mean and spread)",
        description="Learning curves of one or more runs in one figure: each run thin, the mean bold, "
                    "the spread over runs shaded.",
    )
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run directories with a metrics.jsonl")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="image file, .png/.svg/.pdf (default: RUN_DIR/figures/curves.png for one run, "
                        "curves.png here for several)")
    p.add_argument("--metrics", metavar="KEYS", help="comma-separated keys to draw, e.g. valid_acc,valid_loss "
                                                     "(default: every per-epoch metric)")
    p.add_argument("--spread", choices=("std", "range"), default="std",
                   help="shaded band: mean +- standard deviation, or min to max (default: std)")
    p.add_argument("--title", help="figure title (default: the run names)")
    p.set_defaults(handler=_curves)

    p = commands.add_parser(
        "report", help="write a self-contained HTML report of a run",
        description="Write one HTML page with the run's configuration, final numbers, cell diagrams, curves "
                    "and search animation, every image embedded, ready to send to someone. The figures are "
                    "also written to RUN_DIR/figures.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a search or training run directory")
    p.add_argument("-o", "--output", metavar="FILE", help="HTML file (default: RUN_DIR/report.html)")
    p.set_defaults(handler=_report)
