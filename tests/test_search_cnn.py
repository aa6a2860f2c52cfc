"""The CNN search network: shapes, gradients, the mixed operation."""

from __future__ import annotations

import pytest
import torch

from dartsnas.genotype import CNN_PRIMITIVES
from dartsnas.ops.cnn import OPS
from dartsnas.search.cnn import MixedOp, SearchNetwork, num_edges


def tiny(**kw) -> SearchNetwork:
    args = {"C": 4, "num_classes": 5, "layers": 3, "in_channels": 3}
    args.update(kw)
    return SearchNetwork(**args)


def test_shapes_through_normal_and_reduction_cells():
    model = tiny(layers=5)
    x = torch.randn(2, 3, 16, 16)
    reductions = [i for i, c in enumerate(model.cells) if c.reduction]
    assert reductions == [1, 3]  # layers // 3 and 2 * layers // 3
    s0 = s1 = model.stem(x)
    w = torch.softmax(model.alphas_normal, -1)
    C = 4
    for i, cell in enumerate(model.cells):
        if cell.reduction:
            C *= 2
        h = s1.shape[-1]
        s0, s1 = s1, cell(s0, s1, w)
        assert s1.shape[1] == 4 * C  # multiplier * C channels
        assert s1.shape[-1] == (h // 2 if cell.reduction else h)
    assert model(x).shape == (2, 5)
    assert model.alphas_normal.shape == (num_edges(4), len(CNN_PRIMITIVES)) == (14, 8)


def test_every_weight_and_alpha_gets_a_gradient():
    model = tiny()
    loss = model(torch.randn(3, 3, 8, 8)).logsumexp(1).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"
    assert {"alphas_normal", "alphas_reduce"} <= {n for n, _ in model.named_parameters()}
    assert len(model.weight_parameters()) + 2 == len(list(model.parameters()))


def test_alphas_are_parameters_saved_in_state_dict_and_not_in_weight_list():
    model = tiny()
    state = model.state_dict()
    assert "alphas_normal" in state and "alphas_reduce" in state
    weight_ids = {id(p) for p in model.weight_parameters()}
    assert all(id(a) not in weight_ids for a in model.arch_parameters())


def test_mixed_op_without_none_equals_sum_with_zero_op():
    torch.manual_seed(1)
    for stride in (1, 2):
        mixed = MixedOp(4, stride).double()
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
        alpha = torch.randn(len(CNN_PRIMITIVES), dtype=torch.float64, requires_grad=True)
        w = torch.softmax(alpha, -1)
        out = mixed(x, w)
        # Reference: every primitive including the zero op, in the paper's order.
        ops = iter(mixed.ops)
        ref = sum(w[i] * (OPS["none"](4, stride, False)(x) if name == "none" else next(ops)(x))
                  for i, name in enumerate(CNN_PRIMITIVES))
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        g_out, = torch.autograd.grad(out.sum(), alpha, retain_graph=True)
        g_ref, = torch.autograd.grad(ref.sum(), alpha)
        torch.testing.assert_close(g_out, g_ref, rtol=1e-10, atol=1e-12)
        assert g_out[0].abs() > 0  # 'none' still receives a gradient through the softmax


def test_mixed_op_gradcheck_input_and_weights():
    mixed = MixedOp(2, 1).double()
    for m in mixed.modules():  # batch statistics make gradcheck ill-conditioned; use fixed ones
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(len(CNN_PRIMITIVES), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: mixed(x, w), (x, w), eps=1e-6, atol=1e-5)


def test_derived_genotype_is_valid_and_uses_no_none():
    model = tiny()
    g = model.genotype()
    assert len(g.normal) == 8 and len(g.reduce) == 8
    assert all(op != "none" for op, _ in g.normal + g.reduce)
    assert g.normal_concat == (2, 3, 4, 5)


def test_shared_relu_gives_the_same_values_and_gradients():
    torch.manual_seed(2)
    for stride in (1, 2):
        mixed = MixedOp(4, stride).double()
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
        w = torch.softmax(torch.randn(len(CNN_PRIMITIVES), dtype=torch.float64), -1)
        shared = mixed(x, w, torch.relu(x))
        separate = mixed(x, w)
        torch.testing.assert_close(shared, separate, rtol=0, atol=1e-13)
        g1, = torch.autograd.grad(shared.square().sum(), x)
        g2, = torch.autograd.grad(separate.square().sum(), x)
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_evaluation_in_larger_batches_gives_the_batchwise_values():
    """A full evaluation with running statistics takes several training batches per forward
    (search_cnn.EVAL_GROUPING): the mean loss and accuracy equal those of a pass at the training batch
    (float64); with batch statistics, or a cap on the batches, the training batch is kept."""
    from dartsnas.data.images import BatchStream, ImageSet, Normalizer
    from dartsnas.engine import search_cnn as engine
    from dartsnas.search.cnn import SearchNetwork

    torch.manual_seed(0)
    model = SearchNetwork(4, 10, 3, steps=2, multiplier=2).double()
    model.train()
    for _ in range(2):  # running statistics that differ from any one batch's
        model(torch.randn(8, 3, 8, 8, dtype=torch.float64))
    images = ImageSet(torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (37,)))
    stream = BatchStream(images, torch.arange(37), 4, Normalizer((0.5,) * 3, (0.25,) * 3, torch.device("cpu"),
                                                                    torch.float64), train=False)
    seen = []
    forward = model.forward
    model.forward = lambda x, mixing=None: seen.append(len(x)) or forward(x, mixing)
    loss, acc = engine._evaluate(model, stream, None)
    assert seen == [32, 5] and engine.EVAL_GROUPING == 8
    seen.clear()
    engine._evaluate(model, stream, 3)  # a cap counts training batches
    assert seen == [4] * 3
    seen.clear()
    ref = engine._evaluate(model, stream, 100)
    assert seen == [4] * 9 + [1]
    assert loss == pytest.approx(ref[0], rel=1e-12) and acc == pytest.approx(ref[1], rel=1e-12)
    seen.clear()
    engine._evaluate(model, stream, None, batch_stats=True)
    assert seen == [4] * 9 + [1]
