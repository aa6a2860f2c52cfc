"""Figures and reports: cell diagrams, search animations, learning curves, the HTML report."""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dartsnas.cli import main
from dartsnas.genotype import (
    CNN_PRIMITIVES,
    RNN_PRIMITIVES,
    Genotype,
    RecurrentGenotype,
    derive_cnn_cell,
    derive_rnn_cell,
    get_genotype,
    load_genotype,
)
from dartsnas.rundir import RunDir, write_json
from dartsnas.viz import (
    aggregate,
    cell_graph,
    finalize_run,
    plot_curves,
    progress_frames,
    to_dot,
    write_cell_diagrams,
)
from dartsnas.viz.cells import render_bytes
from dartsnas.viz.curves import metric_keys

HAVE_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAVE_DOT, reason="Graphviz 'dot' is not installed (apt install graphviz)")


# --- fake run directories: the files the engines write, with made-up numbers ---------------------


def _softmax_rows(rng: random.Random, rows: int, cols: int, scale: float) -> list[list[float]]:
    out = []
    for _ in range(rows):
        logits = [rng.gauss(0, scale) for _ in range(cols)]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        out.append([e / sum(exps) for e in exps])
    return out


def make_search_run(path: Path, epochs: int = 3, kind: str = "cnn", seed: int = 0) -> Path:
    """A search run directory as ``search cnn``/``search rnn`` leave it, alphas drifting per epoch."""
    rng = random.Random(seed)
    rd = RunDir(path)
    rd.create()
    rd.write_config({"epochs": epochs, "layers": 3, "seed": seed}, f"search-{kind}")
    for epoch in range(1, epochs + 1):
        # Growing logits: the softmax sharpens over the epochs as in a real search.
        scale = 0.5 * epoch
        if kind == "cnn":
            normal = _softmax_rows(rng, 14, len(CNN_PRIMITIVES), scale)
            reduce = _softmax_rows(rng, 14, len(CNN_PRIMITIVES), scale)
            alphas = {"primitives": list(CNN_PRIMITIVES), "normal": normal, "reduce": reduce}
            genotype = Genotype(derive_cnn_cell(normal, CNN_PRIMITIVES, 4), range(2, 6),
                                derive_cnn_cell(reduce, CNN_PRIMITIVES, 4), range(2, 6))
        else:
            recurrent = _softmax_rows(rng, 36, len(RNN_PRIMITIVES), scale)
            alphas = {"primitives": list(RNN_PRIMITIVES), "recurrent": recurrent}
            genotype = RecurrentGenotype(derive_rnn_cell(recurrent, RNN_PRIMITIVES, 8), range(1, 9))
        write_json(path / "genotypes" / f"epoch_{epoch:03d}.json", genotype.to_dict())
        write_json(path / "alphas" / f"epoch_{epoch:03d}.json", alphas)
        record = {"epoch": epoch, "train_loss": 2.0 / epoch, "valid_loss": 2.2 / epoch, "lr": 0.025, "time": 1.5,
                  "genotype": genotype.to_dict()}
        if kind == "cnn":
            record.update(train_acc=30.0 + 10 * epoch, valid_acc=28.0 + 9 * epoch)
        else:
            record.update(valid_ppl=math.exp(2.2 / epoch) * 100)
        rd.append_metrics(record)
    write_json(rd.genotype, genotype.to_dict())
    return path


def make_train_run(path: Path, valid_acc: list[float], genotype: str = "DARTS_V2") -> Path:
    rd = RunDir(path)
    rd.create()
    rd.write_config({"epochs": len(valid_acc), "arch": genotype}, "train-cifar10")
    for epoch, acc in enumerate(valid_acc, 1):
        rd.append_metrics({"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": acc + 2, "valid_loss": 1.1 / epoch,
                           "valid_acc": acc, "valid_acc_top5": min(acc + 20, 100.0), "lr": 0.025, "time": 2.0,
                           "train_images_per_s": 900.0 + epoch})
    write_json(rd.genotype, get_genotype(genotype).to_dict())
    write_json(path / "test.json", {"test_loss": 0.3, "test_acc": valid_acc[-1] - 1})
    return path


# --- cell diagrams --------------------------------------------------------------------------------


def _parse_dot(source: str) -> tuple[set[str], list[tuple[str, str, str | None]]]:
    """Nodes and edges (with their label, if any) of the DOT text ``to_dot`` writes."""
    nodes = set(re.findall(r'^\s*"([^"]+)" \[fillcolor=', source, re.MULTILINE))
    edges = []
    for src, dst, attrs in re.findall(r'^\s*"([^"]+)" -> "([^"]+)" \[(.*)\];$', source, re.MULTILINE):
        label = re.search(r'label="([^"]*)"', attrs)
        edges.append((src, dst, label.group(1) if label else None))
    return nodes, edges


CASES = [("DARTS_V2", "normal"), ("DARTS_V2", "reduce"), ("DARTS_V2_RNN", "recurrent")]


@pytest.mark.parametrize("name,cell", CASES)
def test_dot_source_has_exactly_the_genotype_nodes_and_labelled_edges(name: str, cell: str):
    genotype = get_genotype(name)
    nodes, edges = _parse_dot(to_dot(cell_graph(genotype, cell)))
    labelled = sorted(e for e in edges if e[2] is not None)
    if cell == "recurrent":
        assert nodes == {"x_{t}", "h_{t-1}", "h_{t}"} | {str(i) for i in range(9)}
        expected = sorted((str(j), str(k + 1), op) for k, (op, j) in enumerate(genotype.recurrent))
        fixed = {("x_{t}", "0"), ("h_{t-1}", "0")} | {(str(c), "h_{t}") for c in genotype.concat}
    else:
        gene = getattr(genotype, cell)
        names = ["c_{k-2}", "c_{k-1}", "0", "1", "2", "3"]
        assert nodes == set(names) | {"c_{k}"}
        expected = sorted((names[j], str(k // 2), op) for k, (op, j) in enumerate(gene))
        fixed = {(str(c - 2), "c_{k}") for c in getattr(genotype, cell + "_concat")}
    assert labelled == expected
    assert {(s, d) for s, d, label in edges if label is None} == fixed
    assert len(edges) == len(labelled) + len(fixed)
    if HAVE_DOT:
        # Graphviz's own reading of the source agrees: same nodes, same edges.
        layout = json.loads(render_bytes(to_dot(cell_graph(genotype, cell)), "json"))
        gv_nodes = [o["name"] for o in layout["objects"]]
        assert set(gv_nodes) == nodes
        gv_edges = [(gv_nodes[e["tail"]], gv_nodes[e["head"]], e.get("label") or None) for e in layout["edges"]]
        key = (lambda e: (e[0], e[1], e[2] or ""))
        assert sorted(gv_edges, key=key) == sorted(edges, key=key)


@needs_dot
@pytest.mark.parametrize("fmt", ["svg", "png"])
def test_darts_v2_cells_render(tmp_path: Path, fmt: str):
    files = write_cell_diagrams(get_genotype("DARTS_V2"), tmp_path / "v2", fmt)
    files += write_cell_diagrams(get_genotype("DARTS_V2_RNN"), tmp_path / "v2", fmt)
    assert [f.name for f in files] == [f"v2_normal.{fmt}", f"v2_reduce.{fmt}", f"v2_recurrent.{fmt}"]
    for f, op in zip(files, [b"sep_conv_3x3", b"max_pool_3x3", b"sigmoid"]):
        data = f.read_bytes()
        if fmt == "svg":
            assert data.lstrip().startswith(b"<?xml") and b"<svg" in data and op in data
        else:
            from PIL import Image

            assert data.startswith(b"\x89PNG")
            with Image.open(f) as im:
                assert im.width > 200 and im.height > 100


def test_without_dot_the_source_is_written_with_one_line_on_installing(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    rc = main(["plot", "cell", "DARTS_V2", "-o", str(tmp_path / "v2.svg")])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [str(tmp_path / "v2_normal.dot"), str(tmp_path / "v2_reduce.dot")]
    assert len(out) == 3 and "install Graphviz" in out[2] and "apt install graphviz" in out[2]
    _, edges = _parse_dot((tmp_path / "v2_normal.dot").read_text())
    assert len([e for e in edges if e[2]]) == 8
    assert not list(tmp_path.glob("*.svg"))


@needs_dot
def test_plot_cell_cli_names_and_formats(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "cell", "DARTS_V2"]) == 0
    assert capsys.readouterr().out.split() == ["DARTS_V2_normal.svg", "DARTS_V2_reduce.svg"]
    # A run directory, one cell, format from the file name.
    run = make_search_run(tmp_path / "run", epochs=1)
    assert main(["plot", "cell", str(run), "--cell", "reduce", "-o", "r.png"]) == 0
    assert capsys.readouterr().out.split() == ["r.png"] and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    printed = str(get_genotype("DARTS_V2_RNN"))
    assert main(["plot", "cell", printed, "--format", "pdf"]) == 0
    assert capsys.readouterr().out.split() == ["cell_recurrent.pdf"]
    assert (tmp_path / "cell_recurrent.pdf").read_bytes().startswith(b"%PDF")
    assert main(["plot", "cell", "NO_SUCH_NET"]) == 2
    assert "unknown architecture" in capsys.readouterr().err
    assert main(["plot", "cell", "DARTS_V2", "--cell", "recurrent"]) == 2
    assert "no 'recurrent' cell" in capsys.readouterr().err


# --- search progress ------------------------------------------------------------------------------


def _node_positions(source: str) -> dict[str, tuple[str, str]]:
    plain = render_bytes(source, "plain").decode()
    return {parts[1]: (parts[2], parts[3]) for parts in (line.split() for line in plain.splitlines())
            if parts and parts[0] == "node"}


@needs_dot
def test_animation_frames_keep_every_node_in_place_and_show_the_epoch(tmp_path: Path):
    run = make_search_run(tmp_path / "run", epochs=4)
    genotypes = [Genotype(**json.loads((run / "genotypes" / f"epoch_{e:03d}.json").read_text())) for e in range(1, 5)]
    assert len({g.normal for g in genotypes}) > 1, "the fake run should change its cell between epochs"
    for cell in ("normal", "reduce"):
        frames = progress_frames(genotypes, [1, 2, 3, 4], cell, total=4)
        assert len(frames) == 4
        for epoch, source in enumerate(frames, 1):
            assert f"epoch {epoch} / 4" in source
        positions = [_node_positions(f) for f in frames]
        assert all(p == positions[0] for p in positions[1:])
        assert len(positions[0]) == 7


@needs_dot
def test_plot_search_writes_gifs_alphas_and_curves(tmp_path: Path, capsys):
    from PIL import Image

    run = make_search_run(tmp_path / "run", epochs=3)
    assert main(["plot", "search", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    names = ["progress_normal.gif", "progress_reduce.gif", "alphas_normal.png", "alphas_reduce.png",
             "alpha_heatmap_normal.png", "alpha_heatmap_normal.gif", "alpha_heatmap_reduce.png",
             "alpha_heatmap_reduce.gif", "curves.png"]
    assert printed == [str(run / "figures" / n) for n in names]
    for name in names[:2]:
        with Image.open(run / "figures" / name) as im:
            assert im.n_frames == 3
            sizes = set()
            for i in range(im.n_frames):
                im.seek(i)
                sizes.add(im.size)
            assert len(sizes) == 1


@needs_dot
def test_recurrent_search_run(tmp_path: Path):
    from PIL import Image

    from dartsnas.viz import plot_search

    run = make_search_run(tmp_path / "rnn", epochs=2, kind="rnn")
    files = plot_search(run, tmp_path / "out")
    assert sorted(f.name for f in files) == ["alpha_heatmap_recurrent.gif", "alpha_heatmap_recurrent.png",
                                             "alphas_recurrent.png", "curves.png", "progress_recurrent.gif"]
    with Image.open(tmp_path / "out" / "progress_recurrent.gif") as im:
        assert im.n_frames == 2


def test_plot_search_rejects_a_directory_without_a_search(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["plot", "search", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no per-epoch genotypes" in err


# --- learning curves ------------------------------------------------------------------------------


def test_aggregate_mean_and_spread_over_runs_of_different_length():
    runs = [{1: 1.0, 2: 2.0, 3: 6.0}, {1: 3.0, 2: 4.0}, {1: 5.0, 2: 6.0}]
    agg = aggregate(runs, "std")
    assert agg.epochs == [1, 2, 3] and agg.count == [3, 3, 1]
    assert agg.mean == [3.0, 4.0, 6.0]
    assert agg.low == pytest.approx([1.0, 2.0, 6.0]) and agg.high == pytest.approx([5.0, 6.0, 6.0])
    rng = aggregate(runs, "range")
    assert rng.low == [1.0, 2.0, 6.0] and rng.high == [5.0, 6.0, 6.0]


def test_plot_curves_of_several_runs(tmp_path: Path, capsys):
    runs = [make_train_run(tmp_path / f"seed{i}", [50 + i + 5 * e for e in range(6 - i)]) for i in range(3)]
    out = tmp_path / "c.png"
    assert main(["plot", "curves", *map(str, runs), "-o", str(out), "--spread", "range"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000
    path = plot_curves(runs, tmp_path / "speed.svg", metrics=["valid_acc", "train_images_per_s"])
    assert b"<svg" in path.read_bytes()
    # Throughput is drawn only on request; by default losses, accuracies and perplexities.
    records = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert metric_keys(records) == ["train_loss", "train_acc", "valid_loss", "valid_acc", "valid_acc_top5"]
    assert "train_images_per_s" in metric_keys(records, everything=True)
    assert main(["plot", "curves", str(runs[0]), "--metrics", "valid_ppl"]) == 2
    assert "no run has per-epoch valid_ppl" in capsys.readouterr().err
    assert main(["plot", "curves", str(tmp_path / "nowhere")]) == 2


# --- the HTML report ------------------------------------------------------------------------------

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

# Injected into a copy of the report: once everything has loaded, the body records how many images
# the page has and how many decoded (a broken image has naturalWidth 0).
_PROBE = """<script>window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-loaded", String(ok.length));
});</script>"""
# A deliberately broken image proves that the probe notices one.
_BROKEN = '<img src="data:image/png;base64,iVBORw0KGgo=" alt="broken on purpose">'


def _images_in_chromium(page: Path, tmp_path: Path) -> tuple[int, int]:
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _BROKEN + _PROBE + "</body>"),
                     encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000", "--dump-dom",
           probe.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    body = re.search(r'<body[^>]*data-images="(\d+)"[^>]*data-loaded="(\d+)"', done.stdout)
    assert body, f"chromium did not run the probe (exit {done.returncode}): {done.stderr[-800:]}"
    return int(body.group(1)), int(body.group(2))


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt install chromium)")
def test_report_renders_in_headless_chromium_with_every_image_loaded(tmp_path: Path):
    run = make_search_run(tmp_path / "run", epochs=3)
    files = finalize_run(run)
    report = run / "report.html"
    assert report in files
    text = report.read_text(encoding="utf-8")
    # Self-contained: every image is a data URI and nothing else is fetched.
    sources = re.findall(r'<img src="([^"]+)"', text)
    # Two cell diagrams and two animations need Graphviz; two alpha figures, two final and two per-epoch
    # alpha heat-maps and the curves do not.
    assert len(sources) == (11 if HAVE_DOT else 7) and all(s.startswith("data:image/") for s in sources)
    assert not re.search(r'(src|href)="(?!data:)', text)
    for expected in ("Final numbers", "Architecture", "Learning curves", "Search progress", "Configuration",
                     load_genotype(run).normal[0][0]):
        assert expected in text
    assert HAVE_DOT == ("image/gif" in text) == ("image/svg+xml" in text)
    images, loaded = _images_in_chromium(report, tmp_path)
    assert (images, loaded) == (len(sources) + 1, len(sources))


def test_report_of_a_training_run_and_without_graphviz(tmp_path: Path, monkeypatch, caplog, capsys):
    run = make_train_run(tmp_path / "train", [60.0, 70.0, 75.0])
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with caplog.at_level(logging.WARNING, logger="dartsnas"):
        assert main(["report", str(run), "-o", str(tmp_path / "r.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert text.count("<img ") == 1 and "image/png" in text  # the curves; the cells are DOT source
    assert "digraph cell" in text and "install Graphviz" in text
    assert "best valid_acc (epoch 3)" in text and "final train_loss" in text and "test_acc (test.json)" in text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cell_normal.dot" in warnings[0]
    assert main(["report", str(tmp_path / "empty-dir")]) == 2


def test_finalize_run_never_raises(tmp_path: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="dartsnas"):
        assert finalize_run(tmp_path / "missing") == []
        broken = make_train_run(tmp_path / "broken", [50.0, 60.0])
        (broken / "metrics.jsonl").write_text("{not json\n")
        (broken / "genotype.json").write_text("[]")
        files = finalize_run(broken)
    assert files == [] or all(f.exists() for f in files)
    assert len(caplog.records) >= 2


def test_importing_the_package_and_cli_loads_no_plotting_library():
    code = ("import sys, dartsnas, dartsnas.viz, dartsnas.commands_viz; from dartsnas.cli import build_parser; "
            "build_parser(); print(sorted(m for m in ('matplotlib', 'graphviz') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


# --- a real search ---------------------------------------------------------------------------------


@needs_dot
def test_animation_of_a_real_search_has_one_frame_per_epoch(cifar_train_npz: Path, tmp_path: Path):
    import numpy as np
    import torch
    from PIL import Image

    from dartsnas.engine.search_cnn import SearchConfig, run

    # 48 real CIFAR-10 images: two steps of batch 12 per epoch on each stream keeps this quick.
    with np.load(cifar_train_npz) as f:
        np.savez(tmp_path / "small.npz", x=f["x"][:48], y=f["y"][:48])
    epochs = 3
    # One thread: on a busy two-core machine, more threads for these tiny tensors are many times slower.
    threads = torch.get_num_threads()
    try:
        result = run(SearchConfig(data=str(tmp_path / "small.npz"), save=str(tmp_path / "run"), init_channels=2,
                                  layers=3, batch_size=12, epochs=epochs, eval_batches=1, seed=1, threads=1))
    finally:
        torch.set_num_threads(threads)
    figures = result.run_dir / "figures"
    for cell in ("normal", "reduce"):
        with Image.open(figures / f"progress_{cell}.gif") as im:
            assert im.n_frames == epochs == len(result.metrics)
    assert (result.run_dir / "report.html").is_file() and (figures / "alphas_normal.png").is_file()


def test_search_figures_without_graphviz_keep_everything_else(tmp_path: Path, monkeypatch, caplog):
    run = make_search_run(tmp_path / "run", epochs=1)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with caplog.at_level(logging.WARNING, logger="dartsnas"):
        files = finalize_run(run)
    assert sorted(f.name for f in files) == ["alpha_heatmap_normal.gif", "alpha_heatmap_normal.png",
                                             "alpha_heatmap_reduce.gif", "alpha_heatmap_reduce.png",
                                             "alphas_normal.png", "alphas_reduce.png", "cell_normal.dot",
                                             "cell_reduce.dot", "curves.png", "report.html"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "search animation was not drawn" in warning and "apt install graphviz" in warning


def test_alpha_heatmaps_and_diagnostics_figure(tmp_path: Path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[viz]')")
    from dartsnas.viz import write_alpha_heatmaps, write_diagnostics_figure, write_report

    run = make_search_run(tmp_path / "run", epochs=3)
    assert write_diagnostics_figure(run, tmp_path / "out") == []  # nothing recorded, nothing drawn
    rd = RunDir(run)
    records = rd.read_metrics()
    rd.metrics.unlink()
    for r in records:
        r.update(skip_normal=r["epoch"] - 1, skip_reduce=0, param_free_normal=r["epoch"], entropy_normal=1.5,
                 entropy_reduce=1.4, genotype_changes=3 - r["epoch"])
        rd.append_metrics(r)
    heatmaps = write_alpha_heatmaps(run, tmp_path / "out")
    assert [p.name for p in heatmaps] == ["alpha_heatmap_normal.png", "alpha_heatmap_normal.gif",
                                          "alpha_heatmap_reduce.png", "alpha_heatmap_reduce.gif"]
    diagnostics = write_diagnostics_figure(run, tmp_path / "out")
    assert [p.name for p in diagnostics] == ["diagnostics.png"]
    for p in heatmaps + diagnostics:
        assert p.read_bytes()[:6 if p.suffix == ".gif" else 8] == (b"GIF89a" if p.suffix == ".gif" else b"\x89PNG\r\n\x1a\n")
    html = Path(write_report(run, figures=heatmaps + diagnostics)).read_text()
    assert "Collapse diagnostics" in html and "edges x operations" in html
    assert "softmax(alpha) of the normal cell after each epoch" in html


def test_per_epoch_alpha_heatmaps_mark_each_epochs_cell_on_one_scale(tmp_path: Path, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[viz]')")
    from PIL import Image

    from dartsnas.viz import plotting
    from dartsnas.viz.cells import cell_graph, edge_keys
    from dartsnas.viz.search import load_history, write_alpha_heatmaps

    run = make_search_run(tmp_path / "run", epochs=4, seed=3)
    frames: list[tuple[str, list[str], tuple[float, float], list[list[float]]]] = []
    draw, grabber = plotting.figure_bytes, plotting.frames

    def record(fig) -> None:
        ax = fig.axes[0]
        frames.append((ax.get_title(), [t.get_text() for t in ax.get_yticklabels()], ax.images[0].get_clim(),
                       ax.images[0].get_array().tolist()))

    def keep(fig, *args, **kwargs):  # the final PNG
        record(fig)
        return draw(fig, *args, **kwargs)

    def keep_frames(fig, changing, *args, **kwargs):  # the animation's frames
        grab = grabber(fig, changing, *args, **kwargs)

        def frame():
            record(fig)
            return grab()
        return frame

    monkeypatch.setattr(plotting, "figure_bytes", keep)
    monkeypatch.setattr(plotting, "frames", keep_frames)
    write_alpha_heatmaps(run, tmp_path / "out")
    history = load_history(run)
    assert len(frames) == 10  # per cell: the final PNG, then one frame per epoch
    for cell, drawn in (("normal", frames[1:5]), ("reduce", frames[6:])):
        with Image.open(tmp_path / "out" / f"alpha_heatmap_{cell}.gif") as im:
            assert im.n_frames == 4
        every = [v for e in history.epochs for row in history.alphas[e][cell] for v in row]
        for epoch, genotype, (title, labels, clim, values) in zip(history.epochs, history.genotypes, drawn):
            assert f"epoch {epoch} / 4" in title and cell in title
            assert values == history.alphas[epoch][cell]
            assert clim == pytest.approx((min(every), max(every)))  # one scale for every frame
            kept = {f"{src} → {dst}" for (src, dst, _), _op in edge_keys(cell_graph(genotype, cell))}
            assert {label[2:] for label in labels if label.startswith("* ")} == kept


def test_blitted_animation_frames_match_full_renders():
    """plotting.frames redraws only the changing artists over a kept background: every frame matches
    a full render of the same figure state (up to antialiasing at the edges of redrawn text)."""
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[viz]')")
    import io

    import numpy as np
    from PIL import Image

    from dartsnas.viz import plotting

    fig = plotting.new_figure((4, 3), constrained=False)
    ax = fig.subplots()
    image = ax.imshow(np.zeros((3, 4)), vmin=0, vmax=1)
    texts = [ax.text(j, i, "", ha="center", va="center") for i in range(3) for j in range(4)]
    fig.colorbar(image, ax=ax)
    grab = plotting.frames(fig, lambda: [image, *texts, ax.title])
    rng = np.random.default_rng(0)
    for k in range(3):
        values = rng.random((3, 4))
        image.set_data(values)
        for t, v in zip(texts, values.ravel()):
            t.set_text(f"{v:.2f}")
        ax.set_title(f"frame {k}", y=1.0)
        frame = np.asarray(grab(), dtype=int)
        full = np.asarray(Image.open(io.BytesIO(plotting.figure_bytes(fig))).convert("RGB"), dtype=int)
        assert frame.shape == full.shape
        assert (np.abs(frame - full) > 40).mean() < 0.01
