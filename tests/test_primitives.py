"""``--primitives``: the operation set of a search, from the command line and YAML to derivation,
diagnostics, figures, resume and training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from dartsnas.cli import main
from dartsnas.config import make_config
from dartsnas.engine import search_cnn, search_rnn, train_cnn
from dartsnas.errors import UserError
from dartsnas.genotype import CNN_PRIMITIVES, RNN_PRIMITIVES, check_primitives, derive_cnn_cell, derive_rnn_cell
from dartsnas.genotype import from_dict as genotype_from_dict
from dartsnas.search.diagnostics import cnn_diagnostics
from dartsnas.settings.search_cnn import SearchConfig
from dartsnas.settings.search_rnn import RNNSearchConfig

REDUCED = ("sep_conv_3x3", "none", "skip_connect")  # 'none' not first: alpha's columns follow this order


# -- derivation: known answers ------------------------------------------------------------------


def test_cnn_derivation_indexes_alphas_by_the_runs_operations_and_never_picks_none():
    # Two intermediate nodes: rows 0-1 feed node 2, rows 2-4 feed node 3; columns = REDUCED.
    weights = [
        [0.2, 0.7, 0.1],  # 'none' strongest: the edge's strength is 0.2 (sep_conv_3x3)
        [0.1, 0.3, 0.6],  # skip_connect 0.6
        [0.5, 0.1, 0.4],  # sep_conv_3x3 0.5
        [0.05, 0.9, 0.05],  # nearly all 'none': strength 0.05
        [0.3, 0.1, 0.6],  # skip_connect 0.6
    ]
    assert derive_cnn_cell(weights, REDUCED, steps=2) == [
        ("skip_connect", 1), ("sep_conv_3x3", 0), ("skip_connect", 2), ("sep_conv_3x3", 0)]
    # Without 'none' every column competes.
    ops = ("max_pool_3x3", "dil_conv_5x5")
    assert derive_cnn_cell([[0.4, 0.6], [0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.7, 0.3]], ops, steps=2) == [
        ("max_pool_3x3", 1), ("dil_conv_5x5", 0), ("dil_conv_5x5", 1), ("max_pool_3x3", 2)]


def test_rnn_derivation_with_a_reduced_set():
    ops = ("relu", "none", "identity")
    weights = [[0.1, 0.8, 0.1],  # node 1: only input 0
               [0.3, 0.1, 0.6], [0.5, 0.0, 0.5]]  # node 2: input 0 (identity 0.6) beats input 1 (0.5)
    assert derive_rnn_cell(weights, ops, steps=2) == [("relu", 0), ("identity", 0)]


def test_derivation_refuses_alphas_of_another_operation_set():
    with pytest.raises(ValueError, match="3 columns but the run has 2 operations"):
        derive_cnn_cell([[0.2, 0.3, 0.5]] * 5, ("none", "skip_connect"), steps=2)
    with pytest.raises(ValueError, match="columns"):
        derive_rnn_cell([[0.5, 0.5]], RNN_PRIMITIVES, steps=1)


def test_diagnostics_count_the_runs_operations():
    genotype = genotype_from_dict({
        "normal": [["skip_connect", 0], ["sep_conv_3x3", 1], ["skip_connect", 2], ["skip_connect", 1]],
        "normal_concat": [2, 3], "reduce": [["sep_conv_3x3", 0], ["sep_conv_3x3", 1], ["sep_conv_3x3", 0],
                                            ["skip_connect", 2]], "reduce_concat": [2, 3]})
    zeros = torch.zeros(5, len(REDUCED))
    out = cnn_diagnostics(genotype, genotype, zeros, zeros)
    assert (out["skip_normal"], out["skip_reduce"], out["param_free_normal"], out["param_free_reduce"]) == (3, 1, 3, 1)
    assert out["entropy_normal"] == pytest.approx(math.log(3))  # uniform over the run's three columns
    assert out["genotype_changes"] == 0


# -- the option: checks, command line, YAML --------------------------------------------------------


@pytest.mark.parametrize("names, message", [
    (("sep_conv3x3", "none"), (r"unknown operation 'sep_conv3x3' \(did you mean 'sep_conv_3x3'\?\); known "
                               r"operations: none, max_pool_3x3")),
    (("conv_1x1",), r"unknown operation 'conv_1x1'"),
    (("skip_connect", "none", "skip_connect"), "lists skip_connect more than once"),
    ((), "is empty"),
    (("none",), "only 'none'"),
])
def test_bad_operation_sets_are_one_line_errors(names, message):
    with pytest.raises(UserError, match=message):
        check_primitives(names, CNN_PRIMITIVES)


def test_command_line_errors(tmp_path: Path, capsys):
    for value, message in (("sep_conv_3x3,skip_conect", "did you mean 'skip_connect'?"),
                           ("none", "only 'none'"), ("relu,relu", "relu more than once")):
        command = "rnn" if value.startswith("relu") else "cnn"
        rc = main(["search", command, "--primitives", value, "--save", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()  # refused before the run directory exists
    with pytest.raises(UserError, match=r"--early_stop skip:3 counts skip connections, but --primitives has no"):
        SearchConfig(primitives="none,sep_conv_3x3", early_stop="skip:3").validate()


def test_yaml_list_or_text_and_the_python_api_give_one_form(tmp_path: Path):
    listed, text = tmp_path / "a.yaml", tmp_path / "b.yaml"
    listed.write_text("primitives: [sep_conv_3x3, none, skip_connect]\n")
    text.write_text("primitives: sep_conv_3x3, none, skip_connect\n")
    for path in (listed, text):
        assert make_config(SearchConfig, None, str(path)).primitives == REDUCED
    assert SearchConfig(primitives=list(REDUCED)).primitives == REDUCED
    assert SearchConfig(primitives="sep_conv_3x3,none,skip_connect").primitives == REDUCED
    assert SearchConfig().primitives == CNN_PRIMITIVES and RNNSearchConfig().primitives == RNN_PRIMITIVES
    bad = tmp_path / "c.yaml"
    bad.write_text("primitives: 3\n")
    with pytest.raises(UserError, match="'primitives' must be a list of names"):
        make_config(SearchConfig, None, str(bad))


# -- end to end ------------------------------------------------------------------------------------


@pytest.fixture
def small_npz(cifar_head) -> Path:
    """The first 32 real CIFAR-10 training images: two steps of batch 8 per stream."""
    return cifar_head(32)


def tiny_search(data: Path, save: Path, **kw) -> SearchConfig:
    args = {"data": str(data), "save": str(save), "init_channels": 2, "layers": 3, "batch_size": 8, "epochs": 1,
            "eval_batches": 1, "plots": False, "seed": 5, "threads": 1}
    return SearchConfig(**{**args, **kw})


def test_the_default_set_given_explicitly_changes_nothing(small_npz: Path, tmp_path: Path):
    default = search_cnn.run(tiny_search(small_npz, tmp_path / "a", max_steps=1))
    explicit = search_cnn.run(tiny_search(small_npz, tmp_path / "b", max_steps=1, primitives=",".join(CNN_PRIMITIVES)))
    a = torch.load(default.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(explicit.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert explicit.genotype == default.genotype
    # Default runs keep their genotype.json as it was: the cell alone.
    assert set(json.loads((explicit.run_dir / "genotype.json").read_text())) == {
        "normal", "normal_concat", "reduce", "reduce_concat"}


def test_reduced_cnn_search_records_its_set_resumes_and_trains(small_npz: Path, tmp_path: Path, capsys):
    save = tmp_path / "search"
    rc = main(["search", "cnn", "--data", str(small_npz), "--layers", "3", "--init_channels", "2", "--batch_size", "8",
               "--epochs", "2", "--eval_batches", "1", "--threads", "1", "--no-plots", "--save", str(save),
               "--primitives", ",".join(REDUCED)])
    assert rc == 0
    capsys.readouterr()
    config = yaml.safe_load((save / "config.yaml").read_text())["config"]
    assert config["primitives"] == list(REDUCED)
    state = torch.load(save / "checkpoints" / "last.pt", weights_only=True)
    assert state["primitives"] == list(REDUCED) and state["model"]["alphas_normal"].shape == (14, 3)
    stored = json.loads((save / "genotype.json").read_text())
    assert stored["primitives"] == list(REDUCED)
    genotype = genotype_from_dict(stored)
    assert {op for op, _ in genotype.normal + genotype.reduce} <= {"sep_conv_3x3", "skip_connect"}
    alphas = json.loads((save / "alphas" / "epoch_002.json").read_text())
    assert alphas["primitives"] == list(REDUCED) and len(alphas["normal"][0]) == 3
    # The derivation from the stored alphas is the stored cell.
    assert derive_cnn_cell(alphas["normal"], alphas["primitives"], 4) == list(genotype.normal)
    # A resume keeps the set; another one is refused.
    assert search_cnn.run(resume=save).genotype == genotype
    rc = main(["search", "cnn", "--resume", str(save), "--primitives", "none,skip_connect"])
    assert rc == 2 and "--primitives cannot change when resuming" in capsys.readouterr().err
    # The searched cell trains like any other (the run directory as --arch).
    trained = train_cnn.run(train_cnn.CifarTrainConfig(
        data=str(small_npz), save=str(tmp_path / "train"), arch=str(save), layers=3, init_channels=4, batch_size=8,
        epochs=1, max_steps=1, auxiliary=False, plots=False, threads=1, test_data=str(small_npz)))
    assert trained.genotype == genotype


def test_reduced_rnn_search_without_none(tiny_corpus: Path, tmp_path: Path):
    cfg = RNNSearchConfig(data=str(tiny_corpus), save=str(tmp_path / "rnn"), emsize=8, nhid=8, nhidlast=8,
                          batch_size=4, bptt=5, epochs=1, max_steps=2, eval_batches=1, plots=False, threads=1,
                          primitives="relu,identity")
    result = search_rnn.run(cfg)
    assert {op for op, _ in result.genotype.recurrent} <= {"relu", "identity"}
    state = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["model"]["alphas"].shape == (36, 2)
    assert json.loads((result.run_dir / "genotype.json").read_text())["primitives"] == ["relu", "identity"]


@pytest.mark.slow
def test_figures_of_a_reduced_search_label_the_runs_operations(small_npz: Path, tmp_path: Path, monkeypatch):
    pytest.importorskip("matplotlib")
    from dartsnas.viz import plotting
    from dartsnas.viz.search import load_history, write_alpha_figures, write_alpha_heatmaps

    labels: dict[str, list[str]] = {}
    save = plotting.save_figure

    def keep_labels(fig, path):
        ax = fig.axes[0]
        names = [t.get_text() for t in ax.get_xticklabels()] if "heatmap" in Path(path).name else \
            ax.get_legend_handles_labels()[1]
        labels[Path(path).name] = names
        return save(fig, path)

    monkeypatch.setattr(plotting, "save_figure", keep_labels)
    result = search_cnn.run(tiny_search(small_npz, tmp_path / "s", epochs=2, primitives=REDUCED))
    history = load_history(result.run_dir)
    assert all(history.alphas[e]["primitives"] == list(REDUCED) for e in history.alphas)
    write_alpha_heatmaps(result.run_dir, tmp_path / "fig")
    write_alpha_figures(result.run_dir, tmp_path / "fig")
    assert labels == {name: list(REDUCED) for name in ("alpha_heatmap_normal.png", "alpha_heatmap_reduce.png",
                                                       "alphas_normal.png", "alphas_reduce.png")}
