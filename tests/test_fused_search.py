"""The fused search cell (all edges leaving a state computed together) against the edge-by-edge cell in
float64: outputs, weight, alpha and beta gradients, second-order gradients with either Hessian-vector
product, running statistics after several search steps, and checkpoints written by either."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dartsnas.data.images import ImageData, ImageSet
from dartsnas.engine.search_cnn import SearchConfig, build_search, weight_step
from dartsnas.ops import fastconv
from dartsnas.search import fused
from dartsnas.search.cnn import SearchNetwork, num_edges

LR = 0.5


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def pair(**kw) -> tuple[SearchNetwork, SearchNetwork]:
    """The same tiny float64 network edge by edge and fused, alphas (and betas) off uniform."""
    args = {"C": 4, "num_classes": 3, "layers": 3, "steps": 3, "multiplier": 3}
    args.update(kw)
    torch.manual_seed(1)
    plain = SearchNetwork(**args, fused=False).double()
    with torch.no_grad():
        for a in plain.arch_parameters():
            a.normal_(0, 0.5)
    fast = SearchNetwork(**args, fused=True).double()
    fast.load_state_dict(plain.state_dict())
    for m in (plain, fast):
        fastconv.use_flipped_backward(m)
        m.aux_skip_coef = 0.3
    return plain, fast


def batch(size: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    # An odd size: the factorized reduce pads its shifted branch, PC-DARTS's bypass pooling rounds up.
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 3, size, size, dtype=torch.float64, generator=g), torch.tensor([0, 1, 2, 1])


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        close(sb[key], sa[key])


SETTINGS = [{}, {"lean_memory": False}, {"partial_channels": 2}, {"aux_skip": True},
            {"partial_channels": 2, "aux_skip": True, "edge_normalization": True}, {"dirichlet": True},
            {"checkpoint_cells": True}]


def test_edge_order_covers_every_edge_once_grouped_by_source_state():
    order, sizes = fused.edge_order(4)
    assert sizes == (4, 4, 3, 2, 1)
    assert sorted(order) == list(range(num_edges(4)))
    # Node i's edges start at 2 + 3 + ... ; state 2 feeds nodes 1, 2, 3 through their third edge.
    assert order[8:11] == (4, 7, 11)


@pytest.mark.parametrize("settings", SETTINGS)
def test_outputs_gradients_and_statistics_match(settings):
    plain, fast = pair(**settings)
    assert all(fused.fusable(c) for c in fast.cells)
    x, y = batch()
    for m in (plain, fast):
        if settings.get("dirichlet"):
            m.dirichlet_seed = 5
    out_p, out_f = plain(x), fast(x)
    close(out_f, out_p)
    g_p = torch.autograd.grad(F.cross_entropy(out_p, y), list(plain.parameters()))
    g_f = torch.autograd.grad(F.cross_entropy(out_f, y), list(fast.parameters()))
    for (name, _), gp, gf in zip(plain.named_parameters(), g_p, g_f):
        torch.testing.assert_close(gf, gp, rtol=1e-10, atol=1e-12, msg=name)
    assert_same_state(plain, fast)
    plain.eval()
    fast.eval()
    with torch.no_grad():
        close(fast(x), plain(x))


def test_channels_last_matches():
    plain, fast = pair(partial_channels=2, aux_skip=True)
    fast = fast.to(memory_format=torch.channels_last)
    x, y = batch(8)
    out_p, out_f = plain(x), fast(x.contiguous(memory_format=torch.channels_last))
    close(out_f, out_p)
    g_p = torch.autograd.grad(F.cross_entropy(out_p, y), list(plain.parameters()))
    g_f = torch.autograd.grad(F.cross_entropy(out_f, y), list(fast.parameters()))
    for gp, gf in zip(g_p, g_f):
        close(gf, gp)


def test_double_backward_in_plain_mode_matches():
    """The exact Hessian-vector product differentiates the fused graph twice."""
    from dartsnas.ops import lean

    plain, fast = pair(partial_channels=2, aux_skip=True, edge_normalization=True)
    x, y = batch()
    hv = []
    for m in (plain, fast):
        weights = [p for n, p in m.named_parameters() if "alphas" not in n and "betas" not in n]
        with lean.plain():
            loss = F.cross_entropy(m(x), y)
        g = torch.autograd.grad(loss, weights, create_graph=True)
        v = [torch.ones_like(t) for t in g]
        hv.append(torch.autograd.grad(g, m.arch_parameters(), grad_outputs=v))
    for a, b in zip(*hv):
        close(b, a)


def tiny_search(fuse: bool, **kw):
    torch.manual_seed(3)
    args = {"init_channels": 4, "layers": 3, "nodes": 3, "learning_rate": LR, "epochs": 4, "channels_last": "off",
            "fuse_edges": "on" if fuse else "off"}
    args.update(kw)
    cfg = SearchConfig(**args)
    cfg.validate()
    data = ImageData("t", ImageSet(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)),
                     None, num_classes=3, mean=(0.5,) * 3, std=(0.25,) * 3, pad=0, flip=False)
    return build_search(cfg, data, torch.device("cpu"), dtype=torch.float64)


def batches():
    g = torch.Generator().manual_seed(7)
    train = (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 1]))
    valid = (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([2, 0, 1, 1]))
    return train, valid


@pytest.mark.parametrize("hvp", ["fd", "exact"])
def test_second_order_gradient_matches(hvp):
    train, valid = batches()
    grads = []
    for fuse in (False, True):
        model, w_opt, _, architect = tiny_search(fuse, unrolled=True, hvp=hvp, partial_channels=2, aux_skip=0.5)
        weight_step(model, w_opt, *train, grad_clip=5.0)  # momentum buffers for the virtual step
        grads.append(architect.unrolled_grad(train, valid, LR))
    for a, b in zip(*grads):
        close(b, a)


@pytest.mark.parametrize("settings", [{}, {"partial_channels": 2, "aux_skip": 0.5, "edge_normalization": True}])
def test_several_search_steps_match(settings):
    train, valid = batches()
    models = []
    for fuse in (False, True):
        model, w_opt, _, architect = tiny_search(fuse, **settings)
        model.aux_skip_coef = settings.get("aux_skip", 0.0)
        for _ in range(3):
            architect.step(train, valid, LR)
            weight_step(model, w_opt, *train, grad_clip=5.0)
        models.append(model)
    assert_same_state(*models)
    for m in models:
        m.eval()
    with torch.no_grad():
        close(models[1](valid[0]), models[0](valid[0]))


@pytest.mark.parametrize("writer", [False, True])
def test_state_dict_written_by_either_loads_into_either(writer):
    plain, fast = pair(partial_channels=2, aux_skip=True)
    x, y = batch()
    source = fast if writer else plain
    F.cross_entropy(source(x), y).backward()  # running statistics off their initial values
    state = source.state_dict()
    for target in pair(partial_channels=2, aux_skip=True):
        target.load_state_dict(state)
        assert list(target.state_dict()) == list(state)
        for m in (source, target):
            m.eval()
        with torch.no_grad():
            close(target(x), source(x))
        source.train()


def _storages(cell: nn.Module, name: str) -> set[int]:
    return {getattr(m, name).untyped_storage().data_ptr() for m in cell.edges.modules()
            if isinstance(m, nn.BatchNorm2d)}


@pytest.mark.parametrize("settings", [{}, {"lean_memory": False}])
def test_packed_batch_norm_buffers(settings):
    """The first forward packs each cell's batch-norm buffers into one tensor per kind (each module's
    buffers are views of it); buffers moved apart later take the general path and are packed again; a
    packed state_dict saves and loads like any other."""
    plain, fast = pair(**settings)
    x, y = batch()
    for m in (plain, fast):
        F.cross_entropy(m(x), y).backward()
    for cell in fast.cells:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert len(_storages(cell, name)) == 1
    assert_same_state(plain, fast)
    cell = fast.cells[1]
    bns = [m for m in cell.edges.modules() if isinstance(m, nn.BatchNorm2d)]
    bns[3].running_var = bns[3].running_var.clone()  # e.g. replaced by hand
    bns[5].num_batches_tracked = bns[5].num_batches_tracked.clone()
    assert len(_storages(cell, "running_var")) == 2
    for _ in range(2):
        for m in (plain, fast):
            F.cross_entropy(m(x), y).backward()
    assert_same_state(plain, fast)
    assert len(_storages(cell, "running_var")) == 1 and len(_storages(cell, "num_batches_tracked")) == 1
    buf = io.BytesIO()
    torch.save(fast.state_dict(), buf)
    buf.seek(0)
    fresh = pair(**settings)[1]
    fresh.load_state_dict(torch.load(buf))
    assert_same_state(fast, fresh)
    for m in (plain, fast):
        m.eval()
    with torch.no_grad():
        close(fast(x), plain(x))


def test_other_batch_norms_fall_back_to_edge_by_edge():
    _, fast = pair()
    fast(batch()[0])  # the cells' plans are made and kept
    cell = fast.cells[0]
    edge_bn = cell.edges[0].ops[0][1]
    cell.edges[0].ops[0][1] = nn.SyncBatchNorm(edge_bn.num_features, affine=False).double()
    assert not fused.fusable(cell)
    assert fused.fusable(fast.cells[1])


def test_the_plan_follows_changes_of_the_cell():
    """A cell's plan is made once and kept while its modules stay; a module replaced or a setting
    changed after forwards is seen at the next one, whose values are then the edge-by-edge cell's."""
    plain, fast = pair()
    x, y = batch()
    for m in (plain, fast):
        F.cross_entropy(m(x), y).backward()
    cell, plain_cell = fast.cells[1], plain.cells[1]
    plan = fused.cell_plan(cell)
    assert plan is not None and fused.cell_plan(cell) is plan
    for c in (cell, plain_cell):  # a cumulative moving average cannot be fused
        c.edges[2].ops[3].op[3].momentum = None
    assert not fused.fusable(cell)
    for m in (plain, fast):
        F.cross_entropy(m(x), y).backward()
    assert_same_state(plain, fast)
    for c in (cell, plain_cell):
        c.edges[2].ops[3].op[3].momentum = 0.1
    assert fused.cell_plan(cell) is plan
    bn = cell.edges[0].ops[4].op[3]
    bn.__class__ = type("OwnBatchNorm", (nn.BatchNorm2d,), {})  # a class swapped in place registers nothing
    assert not fused.fusable(cell)
    bn.__class__ = nn.BatchNorm2d
    assert fused.cell_plan(cell) is plan
    channels = cell.edges[4].ops[1][1].num_features
    for c in (cell, plain_cell):  # a new operation module: a new plan holding it
        c.edges[4].ops[1] = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                                          nn.BatchNorm2d(channels, affine=False)).double()
    cell.edges[4].ops[1].load_state_dict(plain_cell.edges[4].ops[1].state_dict())
    assert fused.cell_plan(cell) is not plan
    losses = [F.cross_entropy(m(x), y) for m in (plain, fast)]
    close(losses[1], losses[0])
    assert_same_state(plain, fast)


def test_auto_fuses_small_networks_on_the_cpu_only():
    from dartsnas.engine.search_cnn import use_fused

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_fused("auto", cpu, 8, (8, 8))  # the quickstart
    assert not use_fused("auto", cpu, 16, (32, 32))  # the paper's network
    assert not use_fused("auto", cuda, 8, (8, 8))
    assert use_fused("on", cpu, 16, (32, 32)) and not use_fused("off", cpu, 8, (8, 8))
    # PC-DARTS: the operations see init_channels / K channels.
    assert use_fused("auto", cpu, 16, (32, 32), partial_channels=4)
    assert not use_fused("auto", cpu, 64, (32, 32), partial_channels=4)
    assert not use_fused("off", cpu, 16, (32, 32), partial_channels=4)
