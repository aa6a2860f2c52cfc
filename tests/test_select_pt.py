"""DARTS-PT selection (``dartsnas select``): the perturbation scores against the network with the operation
taken out by hand, known answers on constructed supernets, and the command on a tiny finished search."""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from dartsnas.cli import main
from dartsnas.engine import search_cnn
from dartsnas.engine import select_pt as engine
from dartsnas.errors import UserError
from dartsnas.genotype import CNN_PRIMITIVES, load_genotype
from dartsnas.ops.cnn import OPS
from dartsnas.rundir import RunDir
from dartsnas.search import pt
from dartsnas.search.cnn import SearchNetwork

# -- the scores are those of the network without the operation --------------------------------------


def _tiny_supernet() -> tuple[SearchNetwork, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = SearchNetwork(2, 3, layers=3, steps=2, multiplier=2, lean_memory=False).double()
    with torch.no_grad():
        model.alphas_normal.normal_()
        model.alphas_reduce.normal_()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return model, x, y


def _loss(model: SearchNetwork, x: torch.Tensor, y: torch.Tensor, mixing=None) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(x, mixing), y).item()


def _taken_out(model: SearchNetwork, edge: int, ops: list[int]) -> SearchNetwork:
    """A copy of ``model`` whose normal cells have the operations ``ops`` (columns of alpha) of ``edge``
    replaced by the zero operation: the operation really gone, not just weighted by zero."""
    out = copy.deepcopy(model)
    for cell in out.cells:
        if cell.reduction:
            continue
        mixed = cell.edges[edge]
        for k, column in enumerate(mixed.op_index):
            if column in ops:
                mixed.ops[k] = OPS["none"](2, 1, False)  # normal cells: stride 1
                mixed.relu_first[k] = False
    return out


def test_operation_scores_equal_the_network_without_the_operation():
    model, x, y = _tiny_supernet()
    model.train()
    weights = model.mixing_weights()
    scored = {}

    def evaluate(normal: torch.Tensor) -> pt.Score:
        loss = _loss(model, x, y, (normal, weights[1]))
        return 0.0, loss

    edge = 3
    chosen, scores = pt.select_op(evaluate, weights[0].detach(), edge, pt.op_candidates(CNN_PRIMITIVES), "loss")
    for op, (_, loss) in scores.items():
        scored[op] = _loss(_taken_out(model, edge, [op]), x, y)
        assert loss == pytest.approx(scored[op], rel=1e-12, abs=1e-12), CNN_PRIMITIVES[op]
    assert chosen == max(scored, key=scored.get)
    assert set(scores) == set(range(1, len(CNN_PRIMITIVES)))  # 'none' is never a candidate


def test_edge_scores_equal_the_network_without_the_edge():
    model, x, y = _tiny_supernet()
    model.train()
    weights = model.mixing_weights()

    def evaluate(normal: torch.Tensor) -> pt.Score:
        return 0.0, _loss(model, x, y, (normal, weights[1]))

    node_inputs = pt.node_edges(2)[1]  # the second node's three input edges
    kept, scores = pt.select_edges(evaluate, weights[0].detach(), node_inputs, 2, "loss")
    every_op = list(range(len(CNN_PRIMITIVES)))
    for edge, (_, loss) in scores.items():
        assert loss == pytest.approx(_loss(_taken_out(model, edge, every_op), x, y), rel=1e-12, abs=1e-12)
    assert kept == sorted(scores, key=lambda e: -scores[e][1])[:2]


def test_projection_fixes_decided_edges_in_the_networks_mixing_weights():
    model, x, y = _tiny_supernet()
    model.eval()
    normal, reduce = pt.CellProjection(2), pt.CellProjection(2)
    normal.ops[1] = 4
    normal.kept[1] = [2, 4]
    model.projection = (normal, reduce)
    w_normal, w_reduce = model.mixing_weights()
    assert torch.equal(w_normal[1], torch.eye(len(CNN_PRIMITIVES), dtype=torch.float64)[4])
    assert torch.equal(w_normal[3], torch.zeros(len(CNN_PRIMITIVES), dtype=torch.float64))  # dropped input
    assert torch.equal(w_normal[0], F.softmax(model.alphas_normal[0], -1))  # undecided
    assert torch.equal(w_reduce, F.softmax(model.alphas_reduce, -1))
    # The alphas of undecided edges still get gradients through the projected weights.
    _loss_value = F.cross_entropy(model(x), y)
    _loss_value.backward()
    assert model.alphas_normal.grad[0].abs().sum() > 0 and model.alphas_normal.grad[1].abs().sum() == 0


# -- known answers on constructed supernets ------------------------------------------------------------


def _constructed(n_edges: int, n_ops: int, signal: dict[int, int], seed: int = 0):
    """A supernet of ``n_edges`` mixed edges into one output: ``logits = sum_e sum_o w[e, o] f_eo(x)``,
    where ``f_eo`` is the true labelling for the (edge, op) pairs in ``signal`` and weak noise for all
    others. Returns its evaluator (accuracy, loss) and its mixing weights (uniform)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(400, 5, generator=gen, dtype=torch.float64)
    truth = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y = (x @ truth).argmax(1)
    features = 0.01 * torch.randn(n_edges, n_ops, 400, 4, generator=gen, dtype=torch.float64)
    for edge, op in signal.items():
        features[edge, op] = 10 * (x @ truth)

    def evaluate(weights: torch.Tensor) -> pt.Score:
        logits = torch.einsum("eo,eonc->nc", weights, features)
        acc = (logits.argmax(1) == y).double().mean().item() * 100
        return acc, F.cross_entropy(logits, y).item()

    return evaluate, torch.full((n_edges, n_ops), 1.0 / n_ops, dtype=torch.float64)


@pytest.mark.parametrize("criterion", ["acc", "loss"])
def test_the_operation_that_carries_the_signal_is_selected(criterion):
    evaluate, weights = _constructed(3, len(CNN_PRIMITIVES), {1: 5})
    op, scores = pt.select_op(evaluate, weights, 1, pt.op_candidates(CNN_PRIMITIVES), criterion)
    assert op == 5
    assert scores[5][0] < min(a for k, (a, _) in scores.items() if k != 5)


def test_topology_keeps_the_two_edges_the_node_needs():
    # Edges 1 and 3 each carry the signal; without either one the accuracy stays, so the loss decides.
    evaluate, weights = _constructed(5, 3, {1: 2, 3: 0, 4: 1}, seed=1)
    with torch.no_grad():
        weights[4] = 0.1 * weights[4]  # edge 4 carries the signal too, but weakly
    kept, _ = pt.select_edges(evaluate, weights, [0, 1, 2, 3, 4], 2)
    assert sorted(kept) == [1, 3]


def test_ties_in_accuracy_are_broken_by_the_loss_then_the_index():
    scores = {0: (50.0, 1.0), 1: (40.0, 0.5), 2: (40.0, 0.9), 3: (40.0, 0.9)}
    assert pt.hurt_order(scores) == [2, 3, 1, 0]
    assert pt.hurt_order(scores, "loss") == [0, 2, 3, 1]


def test_schedule_decides_every_edge_then_every_node_in_a_seeded_random_order():
    rounds = pt.schedule(4, seed=3)
    assert len(rounds) == 14 + 3
    for cell in ("normal", "reduce"):
        ops = [d.target for r in rounds for d in r if d.cell == cell and d.kind == "op"]
        nodes = [d.target for r in rounds for d in r if d.cell == cell and d.kind == "edges"]
        assert sorted(ops) == list(range(14)) and sorted(nodes) == [1, 2, 3]
    assert pt.schedule(4, seed=3) == rounds and pt.schedule(4, seed=4) != rounds
    assert all(d.kind == "op" for r in rounds[:14] for d in r)


def test_genotype_of_a_finished_projection():
    cell = pt.CellProjection(3, ops={0: 4, 1: 3, 2: 1, 3: 5, 4: 2, 5: 6, 6: 7, 7: 4, 8: 3},
                             kept={1: [4, 2], 2: [8, 5]})
    assert pt.cell_genotype(cell, CNN_PRIMITIVES) == [
        ("sep_conv_3x3", 0), ("skip_connect", 1), ("avg_pool_3x3", 2), ("max_pool_3x3", 0),
        ("skip_connect", 3), ("dil_conv_3x3", 0)]
    restored = pt.CellProjection.from_dict(3, cell.to_dict())
    assert restored == cell
    with pytest.raises(ValueError):
        pt.cell_genotype(pt.CellProjection(3, ops={0: 4}), CNN_PRIMITIVES)


# -- the command on a tiny finished search ---------------------------------------------------------


def _search(save: Path, **kw) -> search_cnn.SearchResult:
    # The bundled digits (real 8x8 images): two cells of two nodes, C=2, two steps.
    args = {"dataset": "digits", "layers": 3, "init_channels": 2, "nodes": 2, "batch_size": 16, "epochs": 1,
            "max_steps": 2, "eval_batches": 1, "plots": False, "seed": 1, "save": str(save)}
    args.update(kw)
    return search_cnn.run(search_cnn.SearchConfig(**args))


@pytest.fixture(scope="module")
def search_run(tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("pt") / "search"
    _search(save)
    return save


@pytest.fixture
def run_copy(search_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished search, for a test to select in."""
    return Path(shutil.copytree(search_run, tmp_path / "search"))


QUICK = ["--epochs_per_edge", "1", "--tune_steps", "1", "--eval_batches", "1"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_select_writes_its_genotype_beside_the_search_and_changes_nothing_of_it(run_copy: Path, capsys):
    search_files = ["genotype.json", "config.yaml", "metrics.jsonl", "checkpoints/last.pt"]
    before = {name: _digest(run_copy / name) for name in search_files}
    assert main(["select", str(run_copy), *QUICK]) == 0
    out = capsys.readouterr().out
    assert "genotype (DARTS-PT) = Genotype(normal=[" in out
    assert {name: _digest(run_copy / name) for name in search_files} == before
    genotype = load_genotype(str(run_copy / "genotype_pt.json"))
    assert genotype.steps == 2 and "none" not in {op for op, _ in genotype.normal + genotype.reduce}
    selection = run_copy / "selection_pt"
    stored = yaml.safe_load((selection / "config.yaml").read_text())
    assert stored["command"] == "select-pt" and stored["config"]["epochs_per_edge"] == 1
    records = RunDir(selection).read_metrics()
    assert len(records) == 5 + 1  # five edges, then the one node with three inputs, per cell type
    assert all({"decisions", "valid_acc", "valid_loss"} <= set(r) for r in records)
    assert [r["tune_steps"] for r in records] == [1] * 5 + [0]  # nothing to tune after the last decision
    last = records[-1]["decisions"]
    assert last["normal"]["kind"] == "edges" and len(last["normal"]["scores"]) == 3
    # The decisions are the genotype: each edge's kept operation, the node's two kept inputs.
    ops = {r["decisions"][cell]["target"]: r["decisions"][cell]["chosen"] for r in records[:5]
           for cell in ["normal"]}
    kept = last["normal"]["chosen"]
    assert [e for e in genotype.normal[2:]] == [(ops[2 + j], j) for j in kept]
    assert genotype.normal[:2] == ((ops[0], 0), (ops[1], 1))

    # Running it again does no more work and writes the same cell.
    assert main(["select", str(run_copy), *QUICK]) == 0
    assert "already finished" in (selection / "log.txt").read_text()
    assert len(RunDir(selection).read_metrics()) == 6
    assert load_genotype(str(run_copy / "genotype_pt.json")) == genotype
    # ... and refuses settings that would change its decisions.
    assert main(["select", str(run_copy), "--epochs_per_edge", "2"]) == 2
    assert "--epochs_per_edge cannot change" in capsys.readouterr().err


def test_select_waits_for_no_one_holding_the_run(run_copy: Path, capsys):
    holder = RunDir(run_copy)
    holder.lock()
    try:
        assert main(["select", str(run_copy), *QUICK]) == 2
    finally:
        holder.unlock()
    err = capsys.readouterr().err.strip()
    assert "is in use by another dartsnas process" in err and len(err.splitlines()) == 1
    assert not (run_copy / "genotype_pt.json").exists() and not (run_copy / "selection_pt").exists()


def _interrupted(run_dir: Path, cfg: engine.SelectConfig, monkeypatch, in_round: int) -> None:
    """Start a selection and interrupt it (Ctrl-C) at the start of round ``in_round``."""
    real = engine.PTSelection.start_epoch

    def stop(self, epoch):
        if epoch + 1 == in_round:
            raise KeyboardInterrupt
        return real(self, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(engine.PTSelection, "start_epoch", stop)
        with pytest.raises(KeyboardInterrupt):
            engine.run(run_dir, cfg)


@pytest.mark.slow  # two selections, about 15 s
def test_an_interrupted_selection_continues_where_it_stopped(run_copy: Path, tmp_path: Path, monkeypatch):
    reference = Path(shutil.copytree(run_copy, tmp_path / "reference"))
    quick = engine.SelectConfig(epochs_per_edge=1, tune_steps=1, eval_batches=1)
    full = engine.run(reference, quick)

    _interrupted(run_copy, quick, monkeypatch, in_round=3)
    assert not (run_copy / "genotype_pt.json").exists()
    resumed = engine.run(run_copy, engine.settings(run_copy, {}))
    assert resumed.genotype == full.genotype
    assert [r["decisions"] for r in resumed.metrics] == [r["decisions"] for r in full.metrics]
    assert [r["valid_loss"] for r in resumed.metrics] == [r["valid_loss"] for r in full.metrics]


@pytest.mark.parametrize("make, fragment", [
    (lambda d: d, "has no config.yaml"),
    (lambda d: d / "missing", "does not exist"),
    (lambda d: _fake_run(d, "search-rnn"), "is a 'search-rnn' run; DARTS-PT selection needs a finished convolutional"),
    (lambda d: _fake_run(d, "train-cifar10"), "is a 'train-cifar10' run"),
    (lambda d: _fake_run(d, "search-cnn"), "has no checkpoints/last.pt"),
])
def test_bad_run_directories_get_one_line(make, fragment, tmp_path: Path, capsys):
    target = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main(["select", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and err.startswith("dartsnas: error:")
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no lock file left


def _fake_run(folder: Path, command: str) -> Path:
    run = folder / "run"
    RunDir(run).path.mkdir()
    RunDir(run).write_config({"epochs": 1}, command)
    return run


def test_an_unfinished_search_is_refused(tmp_path: Path, capsys):
    class Stop(Exception):
        pass

    def stop(epoch, record):
        raise Stop

    cfg = search_cnn.SearchConfig(dataset="digits", layers=3, init_channels=2, nodes=2, batch_size=16, epochs=2,
                                  max_steps=3, eval_batches=1, plots=False, save=str(tmp_path / "cut"))
    with pytest.raises(Stop):
        search_cnn.run(cfg, on_epoch_end=stop)
    assert main(["select", str(tmp_path / "cut")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds an unfinished search (after epoch 1)" in err and "--resume" in err
    with pytest.raises(UserError, match="unfinished"):
        engine.run(tmp_path / "cut")


def test_search_with_selection_pt_selects_after_the_search(tmp_path: Path, monkeypatch, capsys):
    # The paper's tuning is long: the selection that the search starts is shortened here.
    settings = engine.settings
    monkeypatch.setattr(engine, "settings", lambda run_dir, given: settings(
        run_dir, {**given, "epochs_per_edge": 1, "tune_steps": 1, "eval_batches": 1}))
    save = tmp_path / "search"
    assert main(["search", "cnn", "--dataset", "digits", "--layers", "3", "--init_channels", "2", "--nodes", "2",
                 "--batch_size", "16", "--epochs", "1", "--max_steps", "1", "--eval_batches", "1", "--no-plots",
                 "--selection", "pt", "--save", str(save)]) == 0
    out = capsys.readouterr().out
    selected = load_genotype(str(save / "genotype_pt.json"))
    assert f"genotype (DARTS-PT) = {selected}" in out
    assert len(RunDir(save / "selection_pt").read_metrics()) == 6
    assert (save / "genotype.json").is_file()  # the search's own cell is kept


def test_the_api_refuses_to_continue_a_selection_with_other_decisions(run_copy: Path, monkeypatch):
    quick = engine.SelectConfig(epochs_per_edge=1, tune_steps=1, eval_batches=1)
    _interrupted(run_copy, quick, monkeypatch, in_round=2)
    with pytest.raises(UserError, match="--seed cannot change"):
        engine.run(run_copy, engine.SelectConfig(epochs_per_edge=1, tune_steps=1, eval_batches=1, seed=7))
