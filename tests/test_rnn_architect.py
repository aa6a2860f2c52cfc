"""The recurrent bilevel step (paper eq. 7, clipped as in the authors' rnn/architect.py), checked in float64 on a
tiny search model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dartsnas.engine.search_rnn import RNNSearchConfig, TextBatch, build_search, search_step
from dartsnas.genotype import RNN_PRIMITIVES, RecurrentGenotype, derive_rnn_cell
from dartsnas.search import rnn as rnn_search
from dartsnas.search.architect import _clip_coef
from dartsnas.search.rnn import MixedNode, RNNSearchModel

NTOKEN, B, T = 11, 3, 4
LR, WD = 5.0, 1e-2  # a large eta makes the implicit (Hessian) term large, so a wrong one cannot hide
NO_DROPOUT = {"dropout": 0.0, "dropouth": 0.0, "dropoutx": 0.0, "dropouti": 0.0, "dropoute": 0.0}


def tiny(unrolled=True, hvp="exact", hvp_r=0.01, clip=0.25, **kw):
    torch.manual_seed(3)
    cfg = RNNSearchConfig(emsize=4, nhid=4, nhidlast=4, batch_size=B, bptt=T, learning_rate=LR, weight_decay=WD,
                          grad_clip=clip, unrolled=unrolled, hvp=hvp, hvp_r=hvp_r, beta=0.0, **{**NO_DROPOUT, **kw})
    model, w_opt, architect = build_search(cfg, NTOKEN, torch.device("cpu"), dtype=torch.float64)
    with torch.no_grad():
        model.alphas.normal_(0, 0.5)  # away from uniform, so that every operation matters differently
    model.train()

    def batch(seed):
        tokens = torch.randint(0, NTOKEN, (T + 1, B))
        return TextBatch(tokens[:-1], tokens[1:], torch.randn(B, 4, dtype=torch.float64), seed)

    return model, w_opt, architect, cfg, batch(1), batch(2)


def loss_at(model, params, b: TextBatch):
    out = functional_call(model, params, (b.data, b.hidden))
    return F.cross_entropy(out.logits.reshape(-1, NTOKEN), b.targets.reshape(-1))


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def brute_force(model, train, valid, lr, clip):
    """Differentiate L_val(w - lr (c grad_w L_train + wd w)) through the virtual step itself (c, the clip
    coefficient, is a constant as in the authors' code). Returns the full gradient, the gradient with w'
    held constant, and the clip coefficient of v = grad_w' L_val."""
    alphas = {"alphas": model.alphas}
    w = {n: p.detach().requires_grad_() for n, p in model.named_weight_parameters()}
    g = torch.autograd.grad(loss_at(model, {**w, **alphas}, train), list(w.values()), create_graph=True)
    c = _clip_coef([t.detach() for t in g], clip)
    w_prime = {n: wi - lr * (c * gi + WD * wi) for (n, wi), gi in zip(w.items(), g)}
    full = torch.autograd.grad(loss_at(model, {**w_prime, **alphas}, valid), [model.alphas])
    w_const = {n: t.detach().requires_grad_() for n, t in w_prime.items()}
    loss = loss_at(model, {**w_const, **alphas}, valid)
    direct, *v = torch.autograd.grad(loss, [model.alphas, *w_const.values()])
    return flat(full), flat([direct]), c, _clip_coef(v, clip)


@pytest.mark.parametrize("clip", [1e6, 1e-3])
def test_exact_second_order_equals_brute_force_through_the_clipped_virtual_step(clip):
    model, _, architect, _, train, valid = tiny(hvp="exact", clip=clip)
    ours = flat(architect.unrolled_grad(train, valid, LR))
    full, direct, c, c_v = brute_force(model, train, valid, LR, clip)
    implicit = full - direct
    if clip == 1e6:
        assert c == 1.0 and c_v == 1.0
    else:
        assert c < 0.1 and c_v < 1.0  # both clips active
    # As in the authors' rnn/architect.py, v is clipped too, so the implicit term is the brute-force one times
    # v's coefficient.
    expected = direct + c_v * implicit
    tol = 1e-9 * expected.norm()
    assert (c_v * implicit).norm() > 1e4 * tol  # the Hessian term is far above the tolerance...
    assert (ours - expected).norm() < tol
    # ...so dropping it, flipping it, or missing the clip factors c (virtual step) or c_v (v) would fail.
    wrong = [direct, direct - c_v * implicit]
    if clip < 1:
        wrong += [direct + implicit, direct + c_v * implicit / c]
    for w in wrong:
        assert (w - expected).norm() > 1e3 * tol


def test_finite_difference_at_small_r_equals_exact_product():
    _, _, architect, _, train, valid = tiny(hvp="fd", hvp_r=1e-5)
    w_prime, _, _ = architect.virtual_weights(train, LR)
    _, v = architect._valid_grads_at(w_prime, valid)
    fd, exact = flat(architect.hvp_fd(v, train)), flat(architect.hvp_exact(v, train))
    assert exact.norm() > 0
    assert (fd - exact).norm() < 1e-6 * exact.norm()
    g_fd = flat(architect.unrolled_grad(train, valid, LR, hvp="fd"))
    g_exact = flat(architect.unrolled_grad(train, valid, LR, hvp="exact"))
    assert (g_fd - g_exact).norm() < 1e-7 * g_exact.norm()


def test_first_order_gradient_is_dlval_dalpha_and_leaves_weights_alone():
    model, _, architect, _, train, valid = tiny(unrolled=False)
    ours = architect.grad(train, valid, LR)
    out = model(valid.data, valid.hidden)
    ref = torch.autograd.grad(F.cross_entropy(out.logits.reshape(-1, NTOKEN), valid.targets.reshape(-1)),
                              [model.alphas])
    torch.testing.assert_close(flat(ours), flat(ref), rtol=1e-12, atol=1e-14)
    model.zero_grad(set_to_none=True)
    architect.step(train, valid, LR)
    assert all(p.grad is None for p in model.weight_parameters())


def test_every_weight_and_every_alpha_gets_a_gradient():
    model, *_ = tiny(dropout=0.3, dropouth=0.3, dropoutx=0.3, dropouti=0.3, dropoute=0.3)
    tokens = torch.randint(0, NTOKEN, (T + 1, B))
    out = model(tokens[:-1], model.init_hidden(B).double())
    F.cross_entropy(out.logits.reshape(-1, NTOKEN), tokens[1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
    assert model.alphas.shape == (36, 5)
    assert (model.alphas.grad != 0).all(), "every edge and every operation (including none) must get a gradient"


def test_hidden_state_is_carried_and_detached_between_steps():
    model, w_opt, architect, cfg, train, valid = tiny(unrolled=False)
    with torch.no_grad():
        expect_valid = model(valid.data, valid.hidden).hidden
    _, h_train, h_valid = search_step(model, w_opt, architect, train, valid, LR, cfg)
    assert not h_train.requires_grad and not h_valid.requires_grad and h_train.grad_fn is None
    # The alpha stream continues from its own last state (computed before the weights moved).
    torch.testing.assert_close(h_valid, expect_valid)
    # The training stream continues from the state the weight step reached.
    assert not torch.equal(h_train, train.hidden)
    # The next step starts from those states and still runs (no graph reaches back into the last step).
    nxt = torch.randint(0, NTOKEN, (T + 1, B))
    search_step(model, w_opt, architect, TextBatch(nxt[:-1], nxt[1:], h_train, 5),
                TextBatch(nxt[:-1], nxt[1:], h_valid, 6), LR, cfg)


def test_dropout_masks_repeat_within_an_alpha_step_only():
    model, *_ = tiny(dropout=0.5, dropouth=0.5, dropoutx=0.5, dropouti=0.5)
    tokens = torch.randint(0, NTOKEN, (T, B))
    h = model.init_hidden(B)

    def run(seed):
        return model(tokens, h, torch.Generator().manual_seed(seed)).logits

    assert torch.equal(run(7), run(7)) and not torch.equal(run(7), run(8))


def test_fused_node_matches_plain_autograd_including_second_derivatives():
    torch.manual_seed(0)
    st = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    ch = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    p = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    ops = ("tanh", "relu", "sigmoid", "identity")
    fn = lambda a, b, c: MixedNode.apply(a, b, c, ops)
    assert torch.autograd.gradcheck(fn, (st, ch, p))
    assert torch.autograd.gradgradcheck(fn, (st, ch, p))
    model = RNNSearchModel(NTOKEN, 4, 4, **NO_DROPOUT).double()
    with torch.no_grad():
        model.alphas.normal_()
    x = torch.randint(0, NTOKEN, (T, B))
    fused = model(x, model.init_hidden(B)).logits
    model.rnns[0].fused = False
    torch.testing.assert_close(fused, model(x, model.init_hidden(B)).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ops", [("tanh", "relu", "sigmoid", "identity"), ("relu", "identity"), ("sigmoid",),
                                 ("tanh",), ("identity", "tanh")])
def test_fused_node_fast_backward_equals_differentiable_backward(ops):
    # The backward without a graph (batched activations, derivatives read off f(h)) and the one
    # written for double backward are the same function, for any subset and order of activations.
    gen = torch.Generator().manual_seed(1)
    st = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen)
    ch = 3 * torch.randn(3, 4, 10, dtype=torch.float64, generator=gen)
    p = torch.rand(3, len(ops), dtype=torch.float64, generator=gen)
    ds = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    fast = rnn_search._backward_fast(st, ch, p, ops, ds)
    plain = rnn_search._backward_differentiable(st, ch, p, ops, ds)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_genotype_derivation_known_answer():
    steps = 3  # node 1: 1 edge, node 2: 2 edges, node 3: 3 edges
    none, tanh, relu, sigmoid, identity = range(5)
    rows = [[0.2] * 5 for _ in range(6)]
    rows[0][relu] = 0.9
    rows[1][none] = 0.99  # node 2, edge from 0: only 'none' is strong, so it must not win
    rows[1][tanh] = 0.3
    rows[2][identity] = 0.5  # node 2, edge from 1
    rows[3][sigmoid] = 0.4
    rows[5][tanh] = 0.7  # node 3, edge from 2
    assert derive_rnn_cell(rows, RNN_PRIMITIVES, steps) == [("relu", 0), ("identity", 1), ("tanh", 2)]
    model = RNNSearchModel(NTOKEN, 4, 4, steps=steps)
    with torch.no_grad():
        model.alphas.copy_(torch.tensor(rows).log())
    assert model.genotype() == RecurrentGenotype([("relu", 0), ("identity", 1), ("tanh", 2)], range(1, 4))
