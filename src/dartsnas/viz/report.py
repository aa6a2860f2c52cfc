"""The run report: one self-contained HTML page (every image embedded as a data URI).

The page is meant to be sent to a colleague, so it must not refer to any other file: no external
stylesheet, script, font or image.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..genotype import AnyGenotype, load_genotype
from ..rundir import RunDir, read_json, write_text
from .cells import INSTALL_GRAPHVIZ, INSTALL_HINT, cell_names, dot_problem, write_cell_diagrams
from .curves import metric_keys, read_run_metrics

logger = logging.getLogger("dartsnas")

_MIME = {".svg": "image/svg+xml", ".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg"}

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
.meta { color: #666; } table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; font-size: 0.92em; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: 0.7em; overflow-x: auto; font-size: 0.85em; white-space: pre-wrap; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; } figcaption { color: #555; font-size: 0.9em; }
.note { color: #8a5a00; }
"""


def is_search_run(run_dir: str | Path) -> bool:
    path = Path(run_dir)
    return (path / "genotypes").is_dir() or (path / "alphas").is_dir()


def _guard(name: str, strict: bool, fn: Callable[[], list[Path]]) -> list[Path]:
    if strict:
        return fn()
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one failing figure must not cost the others (or the run)
        logger.warning("%s skipped: %s", name, exc)
        return []


def _genotype(run_dir: Path) -> AnyGenotype | None:
    if not (run_dir / "genotype.json").is_file():
        return None
    return load_genotype(run_dir / "genotype.json")


def write_run_figures(run_dir: str | Path, out_dir: str | Path | None = None, strict: bool = False) -> list[Path]:
    """Every figure the run's files allow, into ``RUN_DIR/figures`` (or ``out_dir``).

    Cell diagrams of ``genotype.json`` (``cell_<cell>.svg``); for search runs the progress GIFs and
    alpha figures; learning curves (``curves.png``) when ``metrics.jsonl`` has per-epoch values.
    With ``strict=False`` a figure that fails is a logged warning, not an exception.
    """
    from .curves import plot_curves
    from .search import (
        load_history,
        write_alpha_figures,
        write_alpha_heatmaps,
        write_diagnostics_figure,
        write_progress_gifs,
    )

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; pass a run directory")
    out = Path(out_dir) if out_dir is not None else run_dir / "figures"
    files: list[Path] = []

    def cells() -> list[Path]:
        genotype = _genotype(run_dir)
        return write_cell_diagrams(genotype, out / "cell", "svg") if genotype is not None else []

    files += _guard("cell diagrams", strict, cells)
    if is_search_run(run_dir):
        history = None

        def progress() -> list[Path]:
            nonlocal history
            history = load_history(run_dir)
            return write_progress_gifs(run_dir, out, history)

        files += _guard("search animation", strict, progress)
        files += _guard("alpha figure", strict, lambda: write_alpha_figures(run_dir, out, history))
        files += _guard("alpha heat-map", strict, lambda: write_alpha_heatmaps(run_dir, out, history))
        files += _guard("diagnostics", strict, lambda: write_diagnostics_figure(run_dir, out))

    def curves() -> list[Path]:
        if not (run_dir / "metrics.jsonl").is_file() or not metric_keys(read_run_metrics(run_dir)):
            return []
        return [plot_curves([run_dir], out / "curves.png", title="search" if is_search_run(run_dir) else None)]

    files += _guard("learning curves", strict, curves)
    problem = dot_problem()
    dots = [f for f in files if f.suffix == ".dot"]
    if problem is not None and (dots or is_search_run(run_dir)):
        # One line for everything Graphviz would have drawn, rather than one per figure.
        missed = [f"the DOT source was written instead ({', '.join(str(f) for f in dots)})"] if dots else []
        if is_search_run(run_dir):
            missed.append("the search animation was not drawn")
        logger.warning("%s, so %s; %s", problem, " and ".join(missed), INSTALL_GRAPHVIZ)
    return files


# --- HTML ----------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def _data_uri(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure(path: Path, caption: str) -> str:
    return (f'<figure><img src="{_data_uri(path)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(rows: Sequence[tuple[str, Any]], header: tuple[str, str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append(f"<tr><th>{html.escape(header[0])}</th><th>{html.escape(header[1])}</th></tr>")
    for key, value in rows:
        cls = ' class="num"' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        out.append(f"<tr><td>{html.escape(str(key))}</td><td{cls}>{html.escape(_fmt(value))}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in d.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _final_numbers(records: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    per_epoch = [r for r in records if isinstance(r.get("epoch"), int)]
    rows: list[tuple[str, Any]] = []
    if per_epoch:
        last = per_epoch[-1]
        rows.append(("epochs", last["epoch"]))
        for key in metric_keys(per_epoch):
            if key in last:
                rows.append((f"final {key}", last[key]))
        # The best epoch matters as much as the last one; accuracy is maximised, the rest minimised.
        for key in metric_keys(per_epoch):
            if not key.startswith(("valid_", "val_", "test_")):
                continue
            values = [(r[key], r["epoch"]) for r in per_epoch
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if len(values) > 1:
                best = max(values) if "acc" in key else min(values)
                rows.append((f"best {key} (epoch {best[1]})", best[0]))
        times = [r["time"] for r in per_epoch if isinstance(r.get("time"), (int, float))]
        if times:
            rows.append(("total time (min)", sum(times) / 60))
    # Records without an epoch are final evaluations (e.g. a test pass after training).
    for record in records:
        if "epoch" not in record:
            rows += [(k, v) for k, v in record.items() if _is_number(v)]
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _test_numbers(run_dir: Path) -> list[tuple[str, Any]]:
    """``test.json`` (the final test-set evaluation some training runs write), if present."""
    try:
        data = read_json(run_dir / "test.json")
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict):
        return []
    return [(f"{k} (test.json)", v) for k, v in data.items() if _is_number(v)]


def render_report(run_dir: str | Path, figures: Sequence[Path]) -> str:
    """The HTML text of the report of ``run_dir`` with the given figure files embedded."""
    rd = RunDir(run_dir)
    name = rd.path.resolve().name
    config: dict[str, Any] = {}
    if rd.config.is_file():
        config = rd.read_config() or {}
    records = read_run_metrics(rd.path) if rd.metrics.is_file() else []
    genotype = _genotype(rd.path)
    by_name = {Path(f).name: Path(f) for f in figures if Path(f).is_file()}

    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>dartsnas run {html.escape(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(name)}</h1>",
    ]
    meta = [f"command: {config.get('command', 'unknown')}"]
    if config.get("dartsnas_version"):
        meta.append(f"dartsnas {config['dartsnas_version']}")
    if config.get("git_sha"):
        meta.append(f"commit {str(config['git_sha'])[:12]}")
    meta.append("report written " + _dt.datetime.now().strftime("%Y-%m-%d %H:%M"))
    parts.append(f'<p class="meta">{html.escape(" · ".join(meta))}</p>')

    numbers = _final_numbers(records) + _test_numbers(rd.path)
    if numbers:
        parts += ["<h2>Final numbers</h2>", _table(numbers)]

    # A protocol directory (search, selection, final runs) writes its results as summary.md.
    summary = rd.path / "summary.md"
    if summary.is_file():
        parts += ["<h2>Protocol summary</h2>", f"<pre>{html.escape(summary.read_text(encoding='utf-8'))}</pre>"]

    if genotype is not None:
        parts += ["<h2>Architecture</h2>", f"<pre>{html.escape(str(genotype))}</pre>"]
        for cell in cell_names(genotype):
            image = by_name.get(f"cell_{cell}.svg")
            source = by_name.get(f"cell_{cell}.dot")
            if image is not None:
                parts.append(_figure(image, f"{cell} cell"))
            elif source is not None:
                parts.append(f'<p class="note">{html.escape(cell)} cell: Graphviz was not available, so here is '
                             f"the DOT source; {html.escape(INSTALL_HINT)}.</p>")
                parts.append(f"<pre>{html.escape(source.read_text(encoding='utf-8'))}</pre>")

    if "curves.png" in by_name:
        parts += ["<h2>Learning curves</h2>", _figure(by_name["curves.png"], "loss and accuracy per epoch")]

    gifs = sorted(n for n in by_name if n.startswith("progress_") and n.endswith(".gif"))
    alphas = sorted(n for n in by_name if n.startswith("alphas_") and n.endswith(".png"))
    heatmaps = sorted(n for n in by_name if n.startswith("alpha_heatmap_") and n.endswith(".png"))
    if gifs or alphas or heatmaps:
        parts.append("<h2>Search progress</h2>")
        for n in gifs:
            cell = n[len("progress_"):-len(".gif")]
            parts.append(_figure(by_name[n], f"most likely {cell} cell after each epoch"))
        for n in alphas:
            cell = n[len("alphas_"):-len(".png")]
            parts.append(_figure(by_name[n], f"softmax(alpha) of every {cell} edge over the epochs"))
        for n in heatmaps:
            cell = n[len("alpha_heatmap_"):-len(".png")]
            parts.append(_figure(by_name[n], f"final softmax(alpha) of the {cell} cell, edges x operations"))
            if f"alpha_heatmap_{cell}.gif" in by_name:
                parts.append(_figure(by_name[f"alpha_heatmap_{cell}.gif"],
                                     f"softmax(alpha) of the {cell} cell after each epoch, edges x operations"))
    if "diagnostics.png" in by_name:
        parts += ["<h2>Collapse diagnostics</h2>",
                  _figure(by_name["diagnostics.png"], "skip connections, parameter-free edges, alpha entropy, "
                                                      "changed edges and curvature per epoch")]

    settings = config.get("config")
    if isinstance(settings, dict) and settings:
        parts += ["<h2>Configuration</h2>", _table(_flatten(settings), header=("setting", "value"))]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dir: str | Path, out: str | Path | None = None, figures: Sequence[Path] | None = None
                 ) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``); draws the run's figures first unless ``figures`` is given."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; pass a run directory")
    if not any((run_dir / f).exists() for f in ("config.yaml", "metrics.jsonl", "genotype.json")):
        raise UserError(f"{run_dir} has none of config.yaml, metrics.jsonl, genotype.json; "
                        f"is it a dartsnas run directory?")
    if figures is None:
        figures = write_run_figures(run_dir)
    path = Path(out) if out is not None else run_dir / "report.html"
    write_text(path, render_report(run_dir, figures))
    return path


def finalize_run(run_dir: str | Path) -> list[Path]:
    """Figures and report at the end of a run; never raises (problems become logged warnings).

    Returns the files written: ``RUN_DIR/figures/*`` and ``RUN_DIR/report.html``.
    """
    files: list[Path] = []
    try:
        files = write_run_figures(run_dir)
        files.append(write_report(run_dir, figures=files))
    except Exception as exc:  # noqa: BLE001 - the run succeeded; a picture must not turn it into a failure
        logger.warning("figures skipped: %s", exc)
    return files
