"""Mixed operations reshaped for robustness: PC-DARTS (partial channels, edge normalisation) and DARTS- (aux skip).

Known answers on hand-made inputs in float64, the identity settings that reproduce plain DARTS bit for bit,
and the second-order alpha (and beta) gradient against a finite difference of the unrolled objective.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.func import functional_call

from dartsnas.cli import main
from dartsnas.data.images import ImageData, ImageSet
from dartsnas.engine.search_cnn import SearchConfig, build_search, resume_config, weight_step
from dartsnas.errors import UserError
from dartsnas.genotype import CNN_PRIMITIVES
from dartsnas.search.cnn import MixedOp, SearchCell, SearchNetwork
from dartsnas.search.robust import aux_skip_coefficient, channel_shuffle, node_softmax

LR, MOMENTUM, WD = 0.5, 0.9, 3e-4


def tiny_data() -> ImageData:
    return ImageData("t", ImageSet(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)),
                     None, num_classes=3, mean=(0.5,), std=(0.25,), pad=0, flip=False)


def tiny_search(dtype=torch.float64, **kw):
    torch.manual_seed(3)
    args = {"init_channels": 4, "layers": 3, "learning_rate": LR, "momentum": MOMENTUM, "weight_decay": WD,
            "epochs": 4, "channels_last": "off"}
    args.update(kw)
    cfg = SearchConfig(**args)
    cfg.validate()
    return build_search(cfg, tiny_data(), torch.device("cpu"), dtype=dtype)


def batches(dtype=torch.float64):
    gen = torch.Generator().manual_seed(7)
    train = (torch.randn(4, 1, 8, 8, generator=gen, dtype=dtype), torch.tensor([0, 1, 2, 1]))
    valid = (torch.randn(4, 1, 8, 8, generator=gen, dtype=dtype), torch.tensor([2, 0, 1, 1]))
    return train, valid


def search_steps(n: int = 2, **kw) -> list[torch.Tensor]:
    """Alphas and weights after ``n`` search steps (alpha step, then weight step) in float32."""
    model, w_opt, _sched, architect = tiny_search(dtype=torch.float32, **kw)
    train, valid = batches(torch.float32)
    for _ in range(n):
        architect.step(train, valid, LR)
        weight_step(model, w_opt, *train, grad_clip=5.0)
    return [t.detach().clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("extra", [{}, {"unrolled": True, "hvp": "exact"}, {"unrolled": True, "hvp": "fd"},
                                   {"checkpoint_cells": True}, {"lean_memory": False}, {"channels_last": "on"}])
def test_identity_settings_reproduce_plain_darts_bit_for_bit(extra):
    plain = search_steps(**extra)
    identity = search_steps(partial_channels=1, edge_normalization=False, aux_skip=0.0, **extra)
    assert len(plain) == len(identity)
    for a, b in zip(plain, identity):
        assert torch.equal(a, b)


def test_identity_mixed_op_is_the_weighted_sum_of_its_operations():
    torch.manual_seed(0)
    op = MixedOp(4, 1, lean_memory=False).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    w = F.softmax(torch.randn(len(CNN_PRIMITIVES), dtype=torch.float64), -1)
    expected = sum(w[i] * o(x) for i, o in zip(op.op_index, op.ops))
    assert torch.equal(op(x, w), expected)


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(6.0).reshape(1, 6, 1, 1)
    # groups of 2 channels: [0 1] [2 3] [4 5] -> 0 2 4 1 3 5
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]
    cl = torch.randn(2, 6, 3, 3).contiguous(memory_format=torch.channels_last)
    out = channel_shuffle(cl, 2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, channel_shuffle(cl.contiguous(), 2))


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_mixed_op_equals_hand_computation(stride):
    torch.manual_seed(1)
    C, K = 4, 2
    op = MixedOp(C, stride, lean_memory=False, partial_channels=K).double()
    assert all(m.in_channels == C // K for m in op.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(2, C, 6, 6, dtype=torch.float64)
    w = F.softmax(torch.randn(len(CNN_PRIMITIVES), dtype=torch.float64), -1)
    # By hand: the first C/K channels through the operations, the others past them (2x2 max pooling on a
    # stride-2 edge), concatenated, then output channel i*K + g = channel i of group g.
    selected, rest = x[:, :C // K], x[:, C // K:]
    mixed = sum(w[i] * o(selected) for i, o in zip(op.op_index, op.ops))
    if stride == 2:
        rest = F.max_pool2d(rest, 2, 2)
    cat = torch.cat([mixed, rest], 1)
    group = C // K
    expected = torch.stack([cat[:, g * group + i] for i in range(group) for g in range(K)], 1)
    assert torch.allclose(op(x, w), expected, rtol=0, atol=1e-12)
    # The ReLU of the selected channels, shared by the cell, gives the same values.
    assert torch.allclose(op(x, w, F.relu(selected)), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
def test_aux_skip_adds_beta_times_skip(stride):
    torch.manual_seed(2)
    op = MixedOp(4, stride, lean_memory=False, aux_skip=True).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w = F.softmax(torch.randn(len(CNN_PRIMITIVES), dtype=torch.float64), -1)
    plain = sum(w[i] * o(x) for i, o in zip(op.op_index, op.ops))
    skip = x if stride == 1 else op.aux(x)
    if stride == 2:  # the reduction edges' skip: FactorizedReduce, as the skip connection of the search space
        assert type(op.aux).__name__ == "FactorizedReduce"
    assert torch.allclose(op(x, w, aux_coef=0.3), plain + 0.3 * skip, rtol=0, atol=1e-12)
    assert torch.allclose(op(x, w, F.relu(x), aux_coef=0.3), plain + 0.3 * skip, rtol=0, atol=1e-12)


def test_partial_reduction_edge_on_odd_sizes_keeps_the_operations_size():
    op = MixedOp(4, 2, partial_channels=2)
    w = torch.full((len(CNN_PRIMITIVES),), 1 / len(CNN_PRIMITIVES))
    assert op(torch.randn(2, 4, 5, 5), w).shape == (2, 4, 3, 3)
    assert op(torch.randn(2, 4, 6, 6), w).shape == (2, 4, 3, 3)


def test_aux_skip_schedule_decays_linearly_to_zero():
    assert [aux_skip_coefficient(1.0, e, 4) for e in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert aux_skip_coefficient(0.7, 0, 50) == 0.7
    assert aux_skip_coefficient(0.0, 3, 50) == 0.0
    assert aux_skip_coefficient(1.0, 50, 50) == 0.0


def test_edge_normalization_weighs_each_nodes_edges_by_softmax_beta():
    torch.manual_seed(4)
    cell = SearchCell(2, 2, 4, 4, 4, False, False, lean_memory=False).double()
    s0, s1 = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    w = F.softmax(torch.randn(5, len(CNN_PRIMITIVES), dtype=torch.float64), -1)
    betas = torch.tensor([0.3, -1.0, 2.0, 0.1, -0.4], dtype=torch.float64)
    e = node_softmax(betas, 2)
    assert torch.allclose(e[:2].sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(e[2:], F.softmax(betas[2:], -1))
    h0, h1 = cell.preprocess0(s0), cell.preprocess1(s1)
    n2 = e[0] * cell.edges[0](h0, w[0]) + e[1] * cell.edges[1](h1, w[1])
    n3 = e[2] * cell.edges[2](h0, w[2]) + e[3] * cell.edges[3](h1, w[3]) + e[4] * cell.edges[4](n2, w[4])
    assert torch.allclose(cell(s0, s1, w, e), torch.cat([n2, n3], 1), rtol=0, atol=1e-12)


def test_edge_normalization_enters_the_derivation_as_a_product():
    torch.manual_seed(5)
    model = SearchNetwork(4, 3, 3, steps=2, multiplier=2, in_channels=1, edge_normalization=True)
    none, sep3, skip = CNN_PRIMITIVES.index("none"), CNN_PRIMITIVES.index("sep_conv_3x3"), \
        CNN_PRIMITIVES.index("skip_connect")
    with torch.no_grad():
        for a in (model.alphas_normal, model.alphas_reduce):
            a.zero_()
            a[:, none] = 5.0  # 'none' never counts
            a[2, sep3] = 2.0  # node 3: edge from input 0 has the strongest operation...
            a[3, skip] = 1.0
            a[4, skip] = 1.0
        # ...but its edge weight is small: op weights 0.046 vs 0.017, edge weights 0.063 vs 0.468 each.
        model.betas_normal.copy_(torch.tensor([0.0, 0.0, -2.0, 0.0, 0.0]))
        model.betas_reduce.zero_()
    genotype = model.genotype()
    assert [tuple(e) for e in genotype.normal[2:]] == [("skip_connect", 1), ("skip_connect", 2)]
    # Uniform betas change nothing: the alpha-only ranking keeps the edge from input 0.
    assert tuple(genotype.reduce[2]) == ("sep_conv_3x3", 0)
    w = model.selection_weights()["normal"]
    alpha_w = model.arch_weights()["normal"]
    edges = node_softmax(model.betas_normal.detach(), 2).tolist()
    assert w[2][sep3] == pytest.approx(alpha_w[2][sep3] * edges[2])


def test_betas_are_architecture_parameters_not_weights():
    model, _w_opt, _sched, architect = tiny_search(edge_normalization=True, partial_channels=2)
    names = [n for n, _ in model.named_arch_parameters()]
    assert names == ["alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"]
    assert architect.alpha_names == names
    assert not any(n.startswith("betas_") for n, _ in model.named_weight_parameters())
    opt_params = {id(p) for g in architect.arch_optimizer.param_groups for p in g["params"]}
    assert {id(model.betas_normal), id(model.betas_reduce)} <= opt_params
    assert "betas_normal" in model.state_dict()


def _unrolled_loss(model, w_opt, train, valid, arch: dict[str, torch.Tensor]) -> torch.Tensor:
    """L_val(w - xi (m buf + grad_w L_train(w, arch) + wd w), arch) in float64."""
    weights = dict(model.named_weight_parameters())
    w = {n: p.detach().requires_grad_() for n, p in weights.items()}
    x, y = train
    loss = F.cross_entropy(functional_call(model, {**w, **arch}, (x,)), y)
    g = torch.autograd.grad(loss, list(w.values()))
    w_prime = {n: wi.detach() - LR * (MOMENTUM * w_opt.state[weights[n]]["momentum_buffer"] + gi + WD * wi.detach())
               for (n, wi), gi in zip(w.items(), g)}
    x, y = valid
    with torch.no_grad():
        return F.cross_entropy(functional_call(model, {**w_prime, **arch}, (x,)), y)


@pytest.mark.parametrize("hvp,checkpoint_cells", [("exact", False), ("fd", False), ("exact", True)])
def test_second_order_gradient_matches_finite_difference_with_partial_channels_and_betas(hvp, checkpoint_cells):
    model, w_opt, _sched, architect = tiny_search(unrolled=True, hvp=hvp, hvp_r=1e-4, partial_channels=2,
                                                  edge_normalization=True, aux_skip=0.5,
                                                  checkpoint_cells=checkpoint_cells)
    model.aux_skip_coef = 0.5
    train, valid = batches()
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_(0, 0.5)
    weight_step(model, w_opt, *train, grad_clip=5.0)  # non-zero momentum buffers
    grads = architect.unrolled_grad(train, valid, LR)
    arch = dict(model.named_arch_parameters())
    gen = torch.Generator().manual_seed(11)
    direction = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in arch.items()}
    h = 1e-5
    plus = _unrolled_loss(model, w_opt, train, valid, {n: p.detach() + h * direction[n] for n, p in arch.items()})
    minus = _unrolled_loss(model, w_opt, train, valid, {n: p.detach() - h * direction[n] for n, p in arch.items()})
    numeric = float((plus - minus) / (2 * h))
    analytic = float(sum((g * direction[n]).sum() for g, n in zip(grads, architect.alpha_names)))
    # The betas' gradient is part of the check and not negligible.
    beta_part = float(sum((g * direction[n]).sum() for g, n in zip(grads, architect.alpha_names) if "betas" in n))
    assert abs(beta_part) > 1e-3 * abs(analytic)
    # The implicit (Hessian) term matters at this step size: the first-order gradient is far off.
    first = float(sum((g * direction[n]).sum() for g, n in zip(architect.first_order_grad(valid),
                                                                 architect.alpha_names)))
    assert abs(first - numeric) > 1e-3 * abs(numeric)
    tol = 1e-6 if hvp == "exact" else 1e-3
    assert analytic == pytest.approx(numeric, rel=tol, abs=1e-9)


def _grads_of(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("setting", ["checkpoint_cells", "lean_memory", "channels_last"])
def test_options_give_the_same_numbers_with_every_method_on(setting):
    on = {"partial_channels": 2, "edge_normalization": True, "aux_skip": 0.5}
    base, *_ = tiny_search(**on)
    base.aux_skip_coef = 0.5
    other_kw = dict(on, **({"checkpoint_cells": True} if setting == "checkpoint_cells" else
                          {"lean_memory": False} if setting == "lean_memory" else {"channels_last": "on"}))
    other, *_ = tiny_search(**other_kw)
    other.aux_skip_coef = 0.5
    x, y = batches()[0]
    if setting == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for a, b in zip(_grads_of(base, x, y), _grads_of(other, x, y)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_incompatible_channels_give_one_line_error():
    with pytest.raises(UserError, match="--partial_channels 4 must divide --init_channels") as err:
        SearchConfig(init_channels=6, partial_channels=4).validate()
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="--aux_skip"):
        SearchConfig(aux_skip=-1.0).validate()
    with pytest.raises(UserError, match="--partial_channels must be at least 1"):
        SearchConfig(partial_channels=0).validate()


def test_cli_runs_every_method_records_it_and_refuses_to_change_it_on_resume(tmp_path: Path, capsys):
    save = tmp_path / "run"
    rc = main(["search", "cnn", "--dataset", "digits", "--layers", "3", "--init-channels", "4", "--nodes", "2",
               "--batch_size", "8", "--epochs", "2", "--max_steps", "1", "--eval_batches", "1", "--unrolled",
               "--partial_channels", "2", "--edge_normalization", "--aux_skip", "0.7", "--no-plots",
               "--save", str(save)])
    capsys.readouterr()
    assert rc == 0
    stored = yaml.safe_load((save / "config.yaml").read_text())["config"]
    assert (stored["partial_channels"], stored["edge_normalization"], stored["aux_skip"]) == (2, True, 0.7)
    for key, value in (("partial_channels", 1), ("edge_normalization", False), ("aux_skip", 0.0)):
        with pytest.raises(UserError, match=f"--{key} cannot change when resuming"):
            resume_config(save, {key: value})
    state = torch.load(save / "checkpoints" / "last.pt", weights_only=False)
    assert "betas_normal" in state["model"]


def test_alpha_regularisers_leave_the_edge_betas_alone():
    """beta-DARTS and DrNAS's anchor act on the operation alphas; with edge normalisation the betas
    follow them in the architecture parameters and get no gradient from those terms."""
    from dartsnas.data.images import load_image_data
    from dartsnas.engine import search_cnn
    from dartsnas.engine.search_cnn import SearchConfig

    cfg = SearchConfig(dataset="digits", layers=3, init_channels=2, nodes=2, edge_normalization=True,
                       beta_decay=25.0, epochs=4)
    model, _, _, architect = search_cnn.build_search(cfg, load_image_data("digits"), torch.device("cpu"))
    job = search_cnn.CNNSearch(cfg)
    job.architect = architect
    job._set_alpha_penalty(2)
    grads = architect.penalty_grad()
    names = [name for name, _ in model.named_arch_parameters()]
    assert names == ["alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"]
    assert all(g.abs().sum() > 0 for g in grads[:2]) and all(g.abs().sum() == 0 for g in grads[2:])


# Slow (about 9 s each): the resume machinery itself is covered by the default tests of test_loop.py and
# test_search_engine.py; these add that the two methods' state survives it.
@pytest.mark.slow
@pytest.mark.parametrize("options", [{"partial_channels": 2, "edge_normalization": True}, {"aux_skip": 1.0}],
                         ids=["pc-darts", "darts-minus"])
def test_kill_and_resume_mid_search_gives_the_uninterrupted_alphas(options: dict, tmp_path: Path):
    from dartsnas.engine import search_cnn

    def cfg(save: Path) -> SearchConfig:
        return SearchConfig(dataset="digits", layers=3, init_channels=2, nodes=2, batch_size=256, epochs=3,
                            plots=False, threads=1, save=str(save), **options)

    full = search_cnn.run(cfg(tmp_path / "full"))

    class Kill(Exception):
        pass

    def kill(epoch, record):
        if epoch == 1:
            raise Kill

    with pytest.raises(Kill):
        search_cnn.run(cfg(tmp_path / "cut"), on_epoch_end=kill)
    resumed = search_cnn.run(resume=tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("alphas", "betas")))
    assert resumed.genotype == full.genotype
