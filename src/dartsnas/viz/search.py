"""Pictures of a search run: the cell over the epochs (GIF), alpha over the epochs, the curves."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..genotype import AnyGenotype, from_dict
from ..rundir import RunDir, atomic_write, read_json
from .cells import cell_graph, cell_names, dot_problem, edge_keys, render_bytes, to_dot

_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.json$")

# Seconds each GIF frame shows; the last one stays longer so the final cell can be read.
FRAME_SECONDS = 0.6
LAST_FRAME_SECONDS = 2.5


@dataclass
class SearchHistory:
    """What a search run recorded per epoch (1-based epochs, ascending)."""

    epochs: list[int]
    genotypes: list[AnyGenotype]
    alphas: dict[int, dict[str, Any]]
    total_epochs: int | None


def _epoch_files(folder: Path) -> dict[int, Path]:
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _EPOCH_FILE.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def _read(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def load_history(run_dir: str | Path) -> SearchHistory:
    """Read ``genotypes/epoch_XXX.json`` and ``alphas/epoch_XXX.json`` of a search run.

    Falls back to the genotypes in ``metrics.jsonl`` when the per-epoch genotype files are absent.
    """
    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise UserError(f"{rd.path} is not a directory; pass a search run directory")
    genotypes = {epoch: from_dict(_read(path)) for epoch, path in _epoch_files(rd.path / "genotypes").items()}
    if not genotypes:
        for record in _metrics(rd):
            if isinstance(record.get("genotype"), dict) and isinstance(record.get("epoch"), int):
                genotypes[record["epoch"]] = from_dict(record["genotype"])
    if not genotypes:
        raise UserError(f"{rd.path} holds no per-epoch genotypes (genotypes/epoch_XXX.json); "
                        f"is it a search run directory?")
    alphas = {epoch: _read(path) for epoch, path in _epoch_files(rd.path / "alphas").items()}
    total = None
    if rd.config.is_file():
        try:
            total = int(rd.read_config().get("config", {}).get("epochs"))
        except (TypeError, ValueError, AttributeError):
            total = None
    epochs = sorted(genotypes)
    return SearchHistory(epochs, [genotypes[e] for e in epochs], alphas, total)


def _metrics(rd: RunDir) -> list[dict[str, Any]]:
    try:
        return rd.read_metrics()
    except json.JSONDecodeError as exc:
        raise UserError(f"{rd.metrics} is not one JSON object per line ({exc.msg} at line {exc.lineno})") from None


def _frame_title(epoch: int, total: int | None) -> str:
    return f"epoch {epoch} / {total}" if total else f"epoch {epoch}"


def progress_frames(genotypes: Sequence[AnyGenotype], epochs: Sequence[int], cell: str,
                    total: int | None = None) -> list[str]:
    """DOT source of one frame per epoch, all with the same node positions.

    The layout includes every edge any frame has (absent ones invisible) and sizes all edge labels
    alike, so ``dot`` places every node identically in every frame.
    """
    graphs = [cell_graph(g, cell) for g in genotypes]
    union: list[tuple[str, str, int]] = []
    longest = 0
    for graph in graphs:
        for key, op in edge_keys(graph):
            if key not in union:
                union.append(key)
            longest = max(longest, len(op))
    # A fixed order (by target, then source) keeps dot's crossing minimisation identical per frame.
    order = {name: i for i, name in enumerate(graphs[0].all_nodes)}
    union.sort(key=lambda k: (order[k[1]], order[k[0]], k[2]))
    return [to_dot(graph, title=_frame_title(epoch, total), layout_edges=union, label_chars=longest)
            for graph, epoch in zip(graphs, epochs)]


def write_gif(frames: Sequence[Any], path: str | Path) -> Path:
    """Assemble frames (PNG bytes or PIL images) into a looping GIF, padding them to one canvas size."""
    from PIL import Image

    images = [(Image.open(io.BytesIO(f)) if isinstance(f, bytes) else f).convert("RGBA") for f in frames]
    width = max(im.width for im in images)
    height = max(im.height for im in images)
    padded = []
    for im in images:
        canvas = Image.new("RGB", (width, height), "white")
        canvas.paste(im, (0, 0), im)
        padded.append(canvas)
    durations = [int(FRAME_SECONDS * 1000)] * len(padded)
    durations[-1] = int(LAST_FRAME_SECONDS * 1000)
    buf = io.BytesIO()
    # Each frame differs at least in its epoch label, so Pillow never merges two into one.
    padded[0].save(buf, format="GIF", save_all=True, append_images=padded[1:], duration=durations, loop=0,
                   disposal=1, optimize=False)
    path = Path(path)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path


def write_progress_gifs(run_dir: str | Path, out_dir: str | Path, history: SearchHistory | None = None
                        ) -> list[Path]:
    """``progress_<cell>.gif`` per cell type: the most likely cell after each epoch, one frame per epoch.

    Returns ``[]`` when Graphviz is unavailable (see :func:`dartsnas.viz.cells.dot_problem`).
    """
    history = history or load_history(run_dir)
    if dot_problem() is not None:
        return []
    files = []
    for cell in cell_names(history.genotypes[-1]):
        sources = progress_frames(history.genotypes, history.epochs, cell, history.total_epochs)
        frames = [render_bytes(src, "png") for src in sources]
        files.append(write_gif(frames, Path(out_dir) / f"progress_{cell}.gif"))
    return files


def _edge_titles(cell: str, steps: int) -> list[tuple[int, int, str]]:
    """(row, column, title) of every alpha row, in the order the search network stores them."""
    out = []
    if cell == "recurrent":
        for node in range(1, steps + 1):
            for j in range(node):
                out.append((node - 1, j, f"{j} → {node}"))
    else:
        inputs = ("c_{k-2}", "c_{k-1}")
        for node in range(steps):
            for j in range(node + 2):
                src = inputs[j] if j < 2 else str(j - 2)
                out.append((node, j, f"{src} → {node}"))
    return out


def _steps_from_rows(cell: str, rows: int) -> int:
    # CNN: node k has k + 2 inputs; RNN: node k has k inputs (k = 1..steps).
    steps, total = 0, 0
    while total < rows:
        steps += 1
        total += steps + 1 if cell != "recurrent" else steps
    if total != rows:
        raise UserError(f"{rows} alpha rows do not form a {cell} cell")
    return steps


def write_alpha_figures(run_dir: str | Path, out_dir: str | Path, history: SearchHistory | None = None
                        ) -> list[Path]:
    """``alphas_<cell>.png``: one small panel per edge with every operation's softmaxed weight over the epochs.

    Panels of the edges the final genotype keeps have a thick frame.
    """
    history = history or load_history(run_dir)
    epochs = sorted(history.alphas)
    if not epochs:
        return []
    from matplotlib.ticker import MaxNLocator

    from .plotting import new_figure, palette, save_figure

    final = history.genotypes[-1]
    files = []
    for cell in cell_names(final):
        if cell not in history.alphas[epochs[-1]]:
            continue
        primitives = history.alphas[epochs[-1]]["primitives"]
        series = [history.alphas[e][cell] for e in epochs]
        steps = _steps_from_rows(cell, len(series[-1]))
        titles = _edge_titles(cell, steps)
        kept = {(src, dst) for (src, dst, _), _op in edge_keys(cell_graph(final, cell))}
        cols = steps + (0 if cell == "recurrent" else 1)
        width, height = 2.2 * cols + 0.8, 1.7 * steps + 0.9
        # Fixed margins: the constrained layout engine takes seconds on a grid of dozens of panels.
        fig = new_figure(figsize=(width, height), constrained=False)
        fig.subplots_adjust(left=0.5 / width, right=1 - 0.2 / width, bottom=0.55 / height, top=1 - 0.6 / height,
                            wspace=0.12, hspace=0.45)
        axes = fig.subplots(steps, cols, sharex=True, sharey=True, squeeze=False)
        used = set()
        colors = palette(len(primitives))
        marker = "o" if len(epochs) <= 12 else None
        for r, (row, col, title) in enumerate(titles):
            ax = axes[row][col]
            used.add((row, col))
            for p, name in enumerate(primitives):
                ax.plot(epochs, [s[r][p] for s in series], color=colors[p], lw=1.4, marker=marker, ms=3, label=name)
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            src, dst = title.split(" → ")
            if (src, dst) in kept:
                for spine in ax.spines.values():
                    spine.set_linewidth(2.2)
        for row in range(steps):
            for col in range(cols):
                if (row, col) not in used:
                    axes[row][col].set_visible(False)
        handles, labels = axes[0][0].get_legend_handles_labels()
        # The grid is triangular: its empty upper right corner holds the legend.
        fig.legend(handles, labels, loc="upper right", bbox_to_anchor=(1 - 0.3 / width, 1 - 0.7 / height),
                   fontsize=9, frameon=False)
        fig.suptitle(f"softmax(alpha) of the {cell} cell per epoch (thick frame: edge kept)", fontsize=11)
        fig.supxlabel("epoch", fontsize=9, y=0.1 / height)
        files.append(save_figure(fig, Path(out_dir) / f"alphas_{cell}.png"))
    return files


def _heatmap_figure(cell: str, shape: tuple[int, int], primitives: list[str], low: float, high: float
                    ) -> tuple[Callable[[list[list[float]], AnyGenotype, str], Any], Callable[[], list[Any]]]:
    """An edges x operations grid of softmaxed alphas, each value written in its square, the edges a
    genotype keeps marked with ``*``; colours span ``low``..``high``. Returns ``draw(rows, genotype,
    title) -> figure``, which puts one table into the same figure (the frames of an animation reuse the
    figure and the layout computed for the first), and ``changing() -> artists``: what differs between
    two tables (the colours, the numbers, the title, the edge labels), for :func:`plotting.frames`."""
    from .plotting import new_figure

    titles = _edge_titles(cell, _steps_from_rows(cell, shape[0]))
    fig = new_figure(figsize=(0.9 * len(primitives) + 2.2, 0.32 * shape[0] + 1.4))
    ax = fig.subplots()
    image = ax.imshow([[low] * shape[1]] * shape[0], aspect="auto", cmap="viridis", vmin=low, vmax=high)
    ax.set_xticks(range(len(primitives)), primitives, rotation=40, ha="right", fontsize=8)
    texts = [[ax.text(j, i, "", ha="center", va="center", fontsize=6) for j in range(shape[1])]
             for i in range(shape[0])]
    fig.colorbar(image, ax=ax, fraction=0.04)
    first = True

    def label(kept: set[tuple[str, ...]] | None) -> None:
        # The edges in ``kept`` marked with "*" (every edge when None).
        marks = [("* " if kept is None or tuple(t.split(" → ")) in kept else "") + t for _, _, t in titles]
        ax.set_yticks(range(len(titles)), marks, fontsize=8)

    def draw(rows: list[list[float]], genotype: AnyGenotype, title: str) -> Any:
        nonlocal first
        ax.set_title(title, fontsize=10, y=1.0)  # a fixed place: frames redraw the title alone
        if first:  # the layout from the widest labels (every edge marked), then kept for every frame
            label(None)
            fig.draw_without_rendering()
            fig.set_layout_engine("none")
            first = False
        label({(src, dst) for (src, dst, _), _op in edge_keys(cell_graph(genotype, cell))})
        image.set_data(rows)
        for i, row in enumerate(rows):
            for j, value in enumerate(row):
                dark = value - low < 0.5 * (high - low)  # viridis is dark in its lower half
                texts[i][j].set_text(f"{value:.2f}")
                texts[i][j].set_color("white" if dark else "black")
        return fig

    def changing() -> list[Any]:
        return [image, *(t for row in texts for t in row), ax.title, ax.yaxis]

    return draw, changing


def _value_range(tables: Sequence[list[list[float]]]) -> tuple[float, float]:
    low = min(min(row) for rows in tables for row in rows)
    high = max(max(row) for rows in tables for row in rows)
    return low, high


def write_alpha_heatmaps(run_dir: str | Path, out_dir: str | Path, history: SearchHistory | None = None
                         ) -> list[Path]:
    """Per cell type, ``alpha_heatmap_<cell>.png``: the final epoch's softmaxed alphas as an edges x
    operations grid, each value written in it, the edges the final genotype keeps marked with ``*``;
    and ``alpha_heatmap_<cell>.gif``: the same grid after every epoch that saved its alphas, one frame
    each, on one colour scale so that the frames compare."""
    history = history or load_history(run_dir)
    epochs = sorted(history.alphas)
    if not epochs:
        return []
    from . import plotting

    genotype_of = dict(zip(history.epochs, history.genotypes))
    final, last = history.genotypes[-1], history.alphas[epochs[-1]]
    files = []
    for cell in cell_names(final):
        if cell not in last:
            continue
        primitives = last["primitives"]
        # Colours span the values present (early in a search they all sit near 1/|ops|); the numbers
        # written in the squares give the absolute weights.
        shape = (len(last[cell]), len(primitives))
        draw, _ = _heatmap_figure(cell, shape, primitives, *_value_range([last[cell]]))
        fig = draw(last[cell], final, f"softmax(alpha) of the {cell} cell after epoch {epochs[-1]} (* edge kept)")
        files.append(plotting.save_figure(fig, Path(out_dir) / f"alpha_heatmap_{cell}.png"))
        # An epoch's frame marks the edges of that epoch's cell; an epoch without a saved genotype
        # (none in runs this project writes) is left out rather than drawn with another epoch's marks.
        frames = [e for e in epochs if e in genotype_of and cell in history.alphas[e]]
        if not frames:
            continue
        draw, changing = _heatmap_figure(cell, shape, primitives,
                                         *_value_range([history.alphas[e][cell] for e in frames]))
        grab = None
        images = []
        for e in frames:
            fig = draw(history.alphas[e][cell], genotype_of[e], f"softmax(alpha) of the {cell} cell, "
                       f"{_frame_title(e, history.total_epochs)} (* edge kept)")
            grab = grab or plotting.frames(fig, changing)
            images.append(grab())
        files.append(write_gif(images, Path(out_dir) / f"alpha_heatmap_{cell}.gif"))
    return files


# Per-epoch collapse diagnostics of a search's metrics (see docs/variants.md) and how to draw them.
DIAGNOSTIC_PANELS = (
    ("skip connections in the cell", ("skip_normal", "skip_reduce", "identity")),
    ("parameter-free edges in the cell", ("param_free_normal", "param_free_reduce")),
    ("mean alpha entropy", ("entropy_normal", "entropy_reduce", "entropy")),
    ("edges changed since the last epoch", ("genotype_changes",)),
    ("dominant Hessian eigenvalue", ("hessian_eig",)),
)


def write_diagnostics_figure(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """``diagnostics.png``: the search's collapse diagnostics per epoch, one panel per kind that the
    run recorded (skip connections, parameter-free edges, entropy, changed edges, Hessian eigenvalue)."""
    records = _metrics(RunDir(run_dir))
    panels = [(title, [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)])
              for title, keys in DIAGNOSTIC_PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        return []
    from matplotlib.ticker import MaxNLocator

    from .plotting import new_figure, save_figure

    fig = new_figure(figsize=(3.3 * len(panels), 2.9))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            ax.plot([e for e, _ in points], [v for _, v in points], marker="o", ms=3, label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not any(k.startswith("entropy") or k == "hessian_eig" for k in keys):  # counts
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        if len(keys) > 1:
            ax.legend(fontsize=7, frameon=False)
    return [save_figure(fig, Path(out_dir) / "diagnostics.png")]


def plot_search(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Every search picture: progress GIFs, alpha figures and the search curves (``curves.png``).

    Raises :class:`UserError` for a directory that is not a search run.
    """
    from .curves import plot_curves

    history = load_history(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "figures"
    files = write_progress_gifs(run_dir, out, history)
    files += write_alpha_figures(run_dir, out, history)
    files += write_alpha_heatmaps(run_dir, out, history)
    if RunDir(run_dir).metrics.is_file():
        files += write_diagnostics_figure(run_dir, out)
        files.append(plot_curves([run_dir], out / "curves.png", title="search"))
    return files
