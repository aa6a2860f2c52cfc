"""Cell diagrams in the paper's style (figures 4-6): Graphviz DOT text, rendered by ``dot``.

The DOT text is built here by hand, so it is deterministic and testable without Graphviz; the
``dot`` program, run directly (no Python binding needed), only turns it into SVG/PNG/PDF. Without
``dot`` the ``.dot`` source is written instead and the caller tells the user how to install Graphviz.
"""

from __future__ import annotations

import html
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..genotype import AnyGenotype, Genotype, RecurrentGenotype
from ..rundir import atomic_write, write_text

FORMATS = ("svg", "png", "pdf")

INSTALL_GRAPHVIZ = (
    "install Graphviz (Debian/Ubuntu: apt install graphviz; macOS: brew install graphviz; "
    "conda: conda install graphviz)"
)
INSTALL_HINT = f"{INSTALL_GRAPHVIZ} and render it with e.g. dot -Tsvg FILE.dot -o FILE.svg"

# The paper's colour code: inputs green, intermediate nodes blue, output yellow.
_INPUT_COLOR = "darkseagreen2"
_NODE_COLOR = "lightblue"
_OUTPUT_COLOR = "palegoldenrod"
_FONT = "Helvetica"
_EDGE_FONTSIZE = 14


@dataclass(frozen=True)
class CellGraph:
    """The nodes and edges of one cell, as drawn.

    ``edges`` holds ``(source, target, label)``; ``label`` is the operation, or ``None`` for the
    fixed wiring (inputs of a recurrent cell's node 0, intermediate nodes into the output).
    """

    inputs: tuple[str, ...]
    nodes: tuple[str, ...]
    output: str
    edges: tuple[tuple[str, str, str | None], ...]

    @property
    def all_nodes(self) -> tuple[str, ...]:
        return self.inputs + self.nodes + (self.output,)


def cell_names(genotype: AnyGenotype) -> tuple[str, ...]:
    """The cells a genotype has: ``('normal', 'reduce')`` or ``('recurrent',)``."""
    return ("recurrent",) if isinstance(genotype, RecurrentGenotype) else ("normal", "reduce")


def cell_graph(genotype: AnyGenotype, cell: str) -> CellGraph:
    """Nodes and edges of ``cell`` ('normal', 'reduce' or 'recurrent') of ``genotype``."""
    if cell not in cell_names(genotype):
        raise UserError(f"a {genotype.kind.upper()} genotype has no {cell!r} cell; "
                        f"choose from {', '.join(cell_names(genotype))}")
    if isinstance(genotype, Genotype):
        edges_in = genotype.normal if cell == "normal" else genotype.reduce
        concat = genotype.normal_concat if cell == "normal" else genotype.reduce_concat
        inputs = ("c_{k-2}", "c_{k-1}")
        nodes = tuple(str(i) for i in range(len(edges_in) // 2))
        output = "c_{k}"
        # Input index j: 0, 1 are the previous cells' outputs, j >= 2 is intermediate node j - 2.
        name = (lambda j: inputs[j] if j < 2 else str(j - 2))
        edges = [(name(j), str(k // 2), op) for k, (op, j) in enumerate(edges_in)]
        edges += [(str(c - 2), output, None) for c in concat]
    else:
        inputs = ("x_{t}", "h_{t-1}")
        nodes = tuple(str(i) for i in range(genotype.steps + 1))
        output = "h_{t}"
        # Node 0 mixes x_t and h_{t-1} through the cell's input projection; no searched operation.
        edges = [(inputs[0], "0", None), (inputs[1], "0", None)]
        edges += [(str(j), str(k + 1), op) for k, (op, j) in enumerate(genotype.recurrent)]
        edges += [(str(c), output, None) for c in genotype.concat]
    return CellGraph(inputs, nodes, output, tuple(edges))


EdgeKey = tuple[str, str, int]


def edge_keys(graph: CellGraph) -> list[tuple[EdgeKey, str]]:
    """Labelled edges keyed by ``(source, target, n)``: ``n`` tells apart parallel edges (NASNet has some)."""
    seen: dict[tuple[str, str], int] = {}
    out = []
    for src, dst, op in graph.edges:
        if op is None:
            continue
        n = seen.get((src, dst), 0)
        seen[(src, dst)] = n + 1
        out.append(((src, dst, n), op))
    return out


def _q(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fixed_label(text: str, width: int, height: int) -> str:
    # An HTML-like label of a fixed size: the layout then depends on the graph's structure only,
    # never on the text, so frames that differ in their operations keep every node in place.
    return (f'<<TABLE BORDER="0" CELLBORDER="0" CELLPADDING="0" CELLSPACING="0"><TR>'
            f'<TD FIXEDSIZE="TRUE" WIDTH="{width}" HEIGHT="{height}">{html.escape(text)}</TD></TR></TABLE>>')


def to_dot(graph: CellGraph, *, title: str | None = None, layout_edges: Sequence[EdgeKey] | None = None,
           label_chars: int | None = None) -> str:
    """DOT source of a cell diagram, left to right like the paper's figures.

    Args:
        graph: the cell.
        title: text above the diagram (animation frames carry the epoch here).
        layout_edges: for a stable layout across several diagrams, the union of the labelled edges of
            all of them; edges of that union missing from ``graph`` are laid out but invisible.
        label_chars: with ``layout_edges``, the longest operation name among all diagrams, which
            sizes every edge label alike.
    """
    lines = [
        "digraph cell {",
        '  graph [rankdir=LR, bgcolor=white, margin=0.1, nodesep=0.3, ranksep=0.6];',
        f'  node [shape=box, style="filled,rounded", penwidth=1.5, fontname="{_FONT}", fontsize=16, height=0.45];',
        f'  edge [fontname="{_FONT}", fontsize={_EDGE_FONTSIZE}];',
    ]
    stable = layout_edges is not None
    label_w = int(0.62 * _EDGE_FONTSIZE * (label_chars or 12)) + 8
    label_h = _EDGE_FONTSIZE + 6
    if title is not None:
        # Fixed-size title too, so that 'epoch 9' and 'epoch 10' frames have the same canvas.
        title_label = _fixed_label(title, 12 * max(len(title), 14), 26) if stable else _q(title)
        lines.append(f"  graph [label={title_label}, labelloc=t, fontname=\"{_FONT}\", fontsize=18];")
    for name in graph.inputs:
        lines.append(f"  {_q(name)} [fillcolor={_INPUT_COLOR}];")
    for name in graph.nodes:
        lines.append(f"  {_q(name)} [fillcolor={_NODE_COLOR}];")
    lines.append(f"  {_q(graph.output)} [fillcolor={_OUTPUT_COLOR}];")

    labelled = dict(edge_keys(graph))
    if stable:
        missing = set(labelled) - set(layout_edges)
        if missing:
            raise ValueError(f"layout_edges lacks edges of the graph: {sorted(missing)}")
        for key in layout_edges:
            src, dst, _ = key
            op = labelled.get(key)
            label = _fixed_label(op or "", label_w, label_h)
            style = "" if op is not None else ", style=invis"
            lines.append(f"  {_q(src)} -> {_q(dst)} [label={label}{style}];")
    else:
        for (src, dst, _), op in edge_keys(graph):
            lines.append(f"  {_q(src)} -> {_q(dst)} [label={_q(op)}];")
    for src, dst, op in graph.edges:
        if op is None:
            lines.append(f"  {_q(src)} -> {_q(dst)} [color=gray55];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def dot_problem() -> str | None:
    """Why diagrams cannot be rendered here, or ``None`` when they can."""
    if shutil.which("dot") is None:
        return "the Graphviz 'dot' program was not found"
    return None


def render_bytes(source: str, fmt: str) -> bytes:
    """Render DOT source with the ``dot`` program; raises when Graphviz is unavailable (see :func:`dot_problem`).

    The program is run directly: the graphviz Python package would only wrap this same call.
    """
    dot = shutil.which("dot")
    if dot is None:
        raise UserError(f"{dot_problem()}; {INSTALL_GRAPHVIZ}")
    # -q: the fixed-size labels make dot warn about text that merely fills its cell.
    done = subprocess.run([dot, f"-T{fmt}", "-q"], input=source.encode(), capture_output=True, check=False)
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise UserError(f"dot could not render the diagram: {message[0] if message else f'exit status {done.returncode}'}")
    return done.stdout


def render_dot(source: str, path: str | Path) -> Path:
    """Render DOT source to ``path`` (format from its suffix); without Graphviz write ``path.dot`` instead.

    Returns the file written: callers recognise the fallback by its ``.dot`` suffix.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".")
    if fmt == "dot" or dot_problem() is not None:
        out = path.with_suffix(".dot")
        write_text(out, source)
        return out
    data = render_bytes(source, fmt)
    atomic_write(path, lambda f: f.write(data))
    return path


def fallback_message(files: Sequence[Path]) -> str | None:
    """The one line telling the user why they got ``.dot`` files, or ``None`` when nothing fell back."""
    dots = [f for f in files if f.suffix == ".dot"]
    problem = dot_problem()
    if not dots or problem is None:
        return None
    names = ", ".join(str(f) for f in dots)
    return f"{problem}, so the DOT source was written instead ({names}); {INSTALL_HINT}"


def write_cell_diagrams(genotype: AnyGenotype, stem: str | Path, fmt: str = "svg",
                        cells: Sequence[str] | None = None) -> list[Path]:
    """Write one diagram per cell: ``STEM_normal.svg``, ``STEM_reduce.svg`` (or ``STEM_recurrent.svg``).

    ``fmt`` may also be 'dot' (source only). Without Graphviz, ``.dot`` files are written instead.
    """
    if fmt not in FORMATS + ("dot",):
        raise UserError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS + ('dot',))}")
    stem = Path(stem)
    return [write_cell_diagram(genotype, cell, stem.with_name(f"{stem.name}_{cell}.{fmt}"))
            for cell in cells or cell_names(genotype)]


def write_cell_diagram(genotype: AnyGenotype, cell: str, path: str | Path) -> Path:
    """Write the diagram of one cell to ``path`` (format from the suffix; ``.dot`` without Graphviz)."""
    return render_dot(to_dot(cell_graph(genotype, cell)), path)
