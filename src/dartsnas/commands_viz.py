"""``dartsnas plot cell|search|curves`` and ``dartsnas report``: pictures of architectures and runs.

Every command prints the files it wrote, one per line. The drawing packages are optional (the
``viz`` extra): a command that needs one which is missing says so in one line before drawing.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

from .errors import UserError
from .genotype import load_genotype

FORMATS = ("svg", "png", "pdf", "dot")
# Import name -> the name pip knows it by.
_PACKAGES = {"matplotlib": "matplotlib", "PIL": "Pillow"}


def _require(*modules: str) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"this command draws with {_PACKAGES[module]}, which is not installed: "
                            f'pip install "dartsnas[viz]"') from None


def _print_files(files: list[Path]) -> None:
    for f in files:
        print(f)


def cell(args: argparse.Namespace) -> int:
    from .viz.cells import cell_names, fallback_message, write_cell_diagram, write_cell_diagrams

    genotype = load_genotype(args.arch)
    out = Path(args.output) if args.output else None
    fmt = args.format
    if out is not None and out.suffix.lstrip(".") in FORMATS:
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


def search(args: argparse.Namespace) -> int:
    _require("matplotlib", "PIL")
    from .viz.cells import INSTALL_GRAPHVIZ, dot_problem
    from .viz.search import plot_search

    files = plot_search(args.run_dir, args.output)
    _print_files(files)
    problem = dot_problem()
    if problem:
        print(f"{problem}, so the cell animations were not drawn; {INSTALL_GRAPHVIZ} and run this again")
    return 0


def curves(args: argparse.Namespace) -> int:
    _require("matplotlib")
    from .viz.curves import plot_curves

    out = Path(args.output) if args.output else None
    if out is None:
        out = Path(args.run_dirs[0]) / "figures" / "curves.png" if len(args.run_dirs) == 1 else Path("curves.png")
    if out.suffix.lstrip(".") not in ("png", "svg", "pdf"):
        raise UserError(f"-o {out}: the file name must end in .png, .svg or .pdf")
    metrics = args.metrics.split(",") if args.metrics else None
    _print_files([plot_curves(args.run_dirs, out, metrics=metrics, spread=args.spread, title=args.title)])
    return 0


def report(args: argparse.Namespace) -> int:
    from .viz.report import write_report

    path = write_report(args.run_dir, args.output)
    print(path)
    return 0
