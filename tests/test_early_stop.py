"""Early stopping of the search (DARTS+ and R-DARTS) and the dominant Hessian eigenvalue in alpha."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_rnn_engine import Interrupted, interrupt_after
from torch import nn

from dartsnas.engine import search_cnn, search_rnn
from dartsnas.errors import UserError
from dartsnas.search import early_stop
from dartsnas.search.early_stop import (
    Rule,
    Tracker,
    eigen_decision,
    local_average,
    normal_skips,
    parse_rule,
)
from dartsnas.search.hessian import buffers_kept, dominant_eigenvalue
from dartsnas.settings.search_cnn import SearchConfig
from dartsnas.settings.search_rnn import RNNSearchConfig


class TinyMixed(nn.Module):
    """Two mixed edges (softmax over three operations each) and a linear classifier: a DARTS cell in
    miniature, small enough for an explicit Hessian in alpha."""

    def __init__(self) -> None:
        super().__init__()
        self.alphas = nn.Parameter(torch.randn(2, 3, dtype=torch.float64))
        self.w1 = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
        self.out = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += 1
        a, b = alphas.softmax(-1)
        h = a[0] * x + a[1] * torch.tanh(x) + a[2] * x @ self.w1.T
        h = b[0] * h + b[1] * torch.sigmoid(h) + b[2] * torch.tanh(h @ self.w2.T)
        return h @ self.out.T


def _tiny_problem():
    torch.manual_seed(4)
    model = TinyMixed()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    return model, x, y


def test_power_iteration_matches_the_explicit_hessian():
    model, x, y = _tiny_problem()
    explicit = torch.autograd.functional.hessian(lambda a: F.cross_entropy(model(x, a), y), model.alphas.detach())
    eigenvalues = torch.linalg.eigvalsh(explicit.reshape(6, 6))
    expected = float(eigenvalues[eigenvalues.abs().argmax()])
    got = dominant_eigenvalue(lambda: F.cross_entropy(model(x, model.alphas), y), [model.alphas], iterations=300,
                              seed=1)
    assert abs(got - expected) <= 1e-9 * abs(expected)


def test_power_iteration_is_repeatable_and_keeps_buffers():
    model, x, y = _tiny_problem()
    with buffers_kept(model):
        first = dominant_eigenvalue(lambda: F.cross_entropy(model(x, model.alphas), y), [model.alphas], seed=3)
    second = dominant_eigenvalue(lambda: F.cross_entropy(model(x, model.alphas), y), [model.alphas], seed=3)
    assert first == second
    assert float(model.seen) == 1.0  # the first call's forward was undone, the second's was not
    assert model.alphas.grad is None


# -- the --early_stop spec ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec, rule", [
    ("skip:2", Rule("skip", skips=2)),
    (" skip:3 ", Rule("skip", skips=3)),
    ("eigen:1.3", Rule("eigen", ratio=1.3, window=5)),
    ("eigen:1.5:2", Rule("eigen", ratio=1.5, window=2)),
])
def test_parse_good_specs(spec, rule):
    assert parse_rule(spec) == rule


@pytest.mark.parametrize("spec", [None, "", "  "])
def test_parse_no_rule(spec):
    assert parse_rule(spec) is None


@pytest.mark.parametrize("spec, words", [
    ("skip", "not a rule"), ("skip:", "not a rule"), ("skip:two", "must be an integer"),
    ("skip:0", "at least 1"), ("skip:2:3", "not a rule"), ("eigen:abc", "must be a number"),
    ("eigen:0.75", "above 1"), ("eigen:inf", "above 1"), ("eigen:1.3:0", "at least 1"), ("eigen:1.3:x", "integer"),
    ("loss:3", "not a rule"),
])
def test_parse_bad_specs_give_one_line(spec, words):
    with pytest.raises(UserError, match=words) as info:
        parse_rule(spec)
    assert "\n" not in str(info.value)


def test_settings_check_the_rule():
    with pytest.raises(UserError, match="--hessian_eig_every 1"):
        SearchConfig(early_stop="eigen:1.3").validate()
    with pytest.raises(UserError, match="not a rule"):
        SearchConfig(early_stop="skip=2").validate()
    with pytest.raises(UserError, match="recurrent cells have none"):
        RNNSearchConfig(early_stop="skip:2").validate()
    with pytest.raises(UserError, match="hessian_eig_every must be >= 0"):
        RNNSearchConfig(hessian_eig_every=-1).validate()
    SearchConfig(early_stop="eigen:1.3", hessian_eig_every=1).validate()
    RNNSearchConfig(early_stop="eigen:1.3:2", hessian_eig_every=1).validate()


# -- the decisions on hand-made histories --------------------------------------------------------------

def _cell(skips: int, tag: int = 0) -> dict:
    ops = ["skip_connect"] * skips + ["sep_conv_3x3"] * (4 - skips)
    return {"normal": [[op, i % 2] for i, op in enumerate(ops)], "normal_concat": [2, 3],
            "reduce": [["max_pool_3x3", tag % 2], ["max_pool_3x3", 1], ["skip_connect", 0], ["avg_pool_3x3", 2]],
            "reduce_concat": [2, 3]}


def test_skip_rule_stops_at_n_skips_and_keeps_that_cell():
    tracker = Tracker(Rule("skip", skips=2))
    assert tracker.update(0, {"genotype": _cell(0)}) is None
    assert tracker.update(1, {"genotype": _cell(1)}) is None
    reason = tracker.update(2, {"genotype": _cell(3)})
    assert reason is not None and "3 skip connections" in reason
    assert tracker.chosen == {"epoch": 3, "genotype": _cell(3)}
    assert normal_skips(_cell(2)) == 2  # skips of the reduction cell do not count


def test_local_average_clips_at_the_start():
    assert local_average([1.0, 3.0, 5.0, 7.0], 0, 3) == 1.0
    assert local_average([1.0, 3.0, 5.0, 7.0], 1, 3) == 2.0
    assert local_average([1.0, 3.0, 5.0, 7.0], 3, 3) == 5.0


def test_eigen_rule_compares_local_averages_k_epochs_apart():
    rule = Rule("eigen", ratio=1.3, window=2)
    # averages over 2 epochs: 1, 1, 1, 1.1, 1.35 (k = 2 before: 1, 1, 1); 1.35 / 1 > 1.3 at the 5th epoch
    eigs = [1.0, 1.0, 1.0, 1.2, 1.5]
    assert [eigen_decision(rule, eigs[:n]) for n in range(1, 5)] == [None] * 4
    assert eigen_decision(rule, eigs) == 2  # keep the cell of epoch 3 (0-based 2) = i - k
    assert eigen_decision(Rule("eigen", ratio=1.4, window=2), eigs) is None
    assert eigen_decision(rule, [-1.0, -1.0, 5.0]) is None  # no ratio of a non-positive start


def test_eigen_tracker_keeps_the_cell_k_epochs_before_and_survives_a_state_round_trip():
    rule = Rule("eigen", ratio=1.5, window=1)
    tracker = Tracker(rule)
    assert tracker.update(0, {"genotype": _cell(0, 0), "hessian_eig": 1.0}) is None
    resumed = Tracker(rule)
    resumed.load_state(tracker.state())
    assert resumed.update(1, {"genotype": _cell(0, 1), "hessian_eig": 1.2}) is None
    reason = resumed.update(2, {"genotype": _cell(1, 2), "hessian_eig": 2.0})
    assert reason is not None and "epoch 2" in reason
    assert resumed.chosen == {"epoch": 2, "genotype": _cell(0, 1)}


# -- end to end on a tiny digits search ------------------------------------------------------------------

def _tiny(tmp_path, **kw) -> SearchConfig:
    settings = {"epochs": 4, **kw}
    return SearchConfig(dataset="digits", layers=3, init_channels=2, nodes=2, batch_size=256, plots=False,
                        save=str(tmp_path / "run"), **settings)


def test_eigen_stop_writes_the_cell_of_the_epoch_before_and_a_resume_stays_stopped(tmp_path, monkeypatch):
    values = iter([1.0, 2.0, 9.0])
    monkeypatch.setattr(search_cnn, "search_eigenvalue", lambda *args, **kw: next(values))
    result = search_cnn.run(_tiny(tmp_path, hessian_eig_every=1, early_stop="eigen:1.5:1"))
    metrics = result.metrics
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [m["hessian_eig"] for m in metrics] == [1.0, 2.0]
    assert "stopped" not in metrics[0] and "keeping the cell of epoch 1" in metrics[-1]["stopped"]
    run_dir = result.run_dir
    kept = json.loads((run_dir / "genotypes" / "epoch_001.json").read_text())
    assert kept != json.loads((run_dir / "genotypes" / "epoch_002.json").read_text())  # the cells differ here
    assert json.loads((run_dir / "genotype.json").read_text()) == kept
    assert result.genotype.to_dict() == kept
    assert "genotype.json is the cell of epoch 1" in (run_dir / "log.txt").read_text()
    # A resume finds the run stopped and writes the same cell again from its checkpoint.
    (run_dir / "genotype.json").unlink()
    again = search_cnn.run(resume=run_dir)
    assert [m["epoch"] for m in again.metrics] == [1, 2]
    assert json.loads((run_dir / "genotype.json").read_text()) == kept



def test_eigen_stop_after_a_resume_decides_as_an_uninterrupted_run(tmp_path, monkeypatch):
    values = iter([1.0, 1.1, 2.0, 9.0])
    monkeypatch.setattr(search_cnn, "search_eigenvalue", lambda *args, **kw: next(values))
    cfg = _tiny(tmp_path, hessian_eig_every=1, early_stop="eigen:1.5:1")
    with pytest.raises(Interrupted):
        search_cnn.run(cfg, on_epoch_end=interrupt_after(1))
    result = search_cnn.run(resume=cfg.save)  # the eigenvalue of epoch 1 comes from the checkpoint
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3]
    assert "keeping the cell of epoch 2" in result.metrics[-1]["stopped"]
    kept = json.loads((result.run_dir / "genotypes" / "epoch_002.json").read_text())
    assert json.loads((result.run_dir / "genotype.json").read_text()) == kept


def test_skip_stop_keeps_the_cell_of_the_stopping_epoch(tmp_path, monkeypatch):
    counts = iter([1, 2, 3])
    monkeypatch.setattr(early_stop, "normal_skips", lambda genotype: next(counts))
    result = search_cnn.run(_tiny(tmp_path, early_stop="skip:2"))
    assert [m["epoch"] for m in result.metrics] == [1, 2]
    assert "2 skip connections" in result.metrics[-1]["stopped"]
    last = json.loads((result.run_dir / "genotypes" / "epoch_002.json").read_text())
    assert json.loads((result.run_dir / "genotype.json").read_text()) == last

def test_the_eigenvalue_leaves_the_cnn_search_unchanged(tmp_path):
    plain = search_cnn.run(_tiny(tmp_path / "a", epochs=1))
    measured = search_cnn.run(_tiny(tmp_path / "b", epochs=1, hessian_eig_every=1))
    (a,), (b,) = plain.metrics, measured.metrics
    assert "hessian_eig" not in a and math.isfinite(b["hessian_eig"]) and b["hessian_eig"] != 0.0
    for key in ("train_loss", "valid_loss", "valid_acc", "genotype"):
        assert a[key] == b[key]


def test_rnn_search_records_the_eigenvalue_every_n_epochs(tiny_corpus, tmp_path):
    cfg = RNNSearchConfig(data=str(tiny_corpus), save=str(tmp_path / "rnn"), batch_size=8, bptt=10, eval_batches=1,
                          emsize=8, nhid=8, nhidlast=8, epochs=2, plots=False, hessian_eig_every=2)
    metrics = search_rnn.run(cfg).metrics
    assert "hessian_eig" not in metrics[0] and math.isfinite(metrics[1]["hessian_eig"])

