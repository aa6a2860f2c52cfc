"""The bilevel step (paper section 2.3), checked against exact autograd in float64 on a tiny network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dartsnas.data.images import ImageData, ImageSet
from dartsnas.engine.search_cnn import SearchConfig, build_search, weight_step
from dartsnas.ops import fastconv, lean

LR = 0.5  # a large xi makes the implicit (Hessian) term large, so a wrong one cannot hide
MOMENTUM, WD = 0.9, 3e-4


def tiny_search(unrolled: bool = True, hvp: str = "exact", hvp_r: float = 0.01, channels_last: str = "off",
                lean_memory: bool = True, flip_conv_backward: bool = True):
    torch.manual_seed(3)
    cfg = SearchConfig(init_channels=2, layers=3, learning_rate=LR, momentum=MOMENTUM, weight_decay=WD,
                       unrolled=unrolled, hvp=hvp, hvp_r=hvp_r, epochs=4, channels_last=channels_last,
                       lean_memory=lean_memory, flip_conv_backward=flip_conv_backward)
    data = ImageData("t", ImageSet(torch.zeros(1, 1, 6, 6, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)),
                     None, num_classes=3, mean=(0.5,), std=(0.25,), pad=0, flip=False)
    model, w_opt, _scheduler, architect = build_search(cfg, data, torch.device("cpu"), dtype=torch.float64)
    # Alphas away from uniform, so that every operation matters differently.
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_(0, 0.5)
    train = (torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1]))
    valid = (torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.tensor([2, 0, 1, 1]))
    # One real weight step first, so that the momentum buffers the virtual step uses are non-zero.
    weight_step(model, w_opt, *train, grad_clip=5.0)
    return model, w_opt, architect, train, valid


def loss_of(model, params, batch):
    x, y = batch
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def brute_force_unrolled(model, w_opt, train, valid, lr):
    """grad_alpha L_val(w - lr * (m * buf + grad_w L_train(w, alpha) + wd * w), alpha), differentiating
    through the virtual step itself (no Hessian-vector product anywhere)."""
    weights = dict(model.named_weight_parameters())
    alphas = {"alphas_normal": model.alphas_normal, "alphas_reduce": model.alphas_reduce}
    w = {n: p.detach().requires_grad_() for n, p in weights.items()}
    with lean.plain():  # this graph is differentiated twice
        train_loss = loss_of(model, {**w, **alphas}, train)
    g = torch.autograd.grad(train_loss, list(w.values()), create_graph=True)
    w_prime = {}
    for (name, wi), gi in zip(w.items(), g):
        buf = w_opt.state[weights[name]]["momentum_buffer"]
        w_prime[name] = wi - lr * (MOMENTUM * buf + gi + WD * wi)
    loss = loss_of(model, {**w_prime, **alphas}, valid)
    full = torch.autograd.grad(loss, list(alphas.values()), retain_graph=True)
    # The same objective with w' treated as a constant: the gradient without the implicit term.
    w_const = {n: t.detach() for n, t in w_prime.items()}
    direct = torch.autograd.grad(loss_of(model, {**w_const, **alphas}, valid), list(alphas.values()))
    return full, direct


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def test_exact_second_order_equals_brute_force_unrolled_gradient():
    model, w_opt, architect, train, valid = tiny_search(hvp="exact")
    ours = flat(architect.unrolled_grad(train, valid, LR))
    full, direct = brute_force_unrolled(model, w_opt, train, valid, LR)
    full, direct = flat(full), flat(direct)
    tol = 1e-9 * full.norm()
    implicit = (full - direct).norm()
    # The Hessian term is many orders above the tolerance: dropping it, flipping its sign or scaling
    # it by anything but xi would fail the comparison below.
    assert implicit > 1e4 * tol
    assert implicit > 0.1 * full.norm()
    assert (ours - full).norm() < tol
    wrong_sign = direct + (full - direct) * -1
    assert (wrong_sign - full).norm() > 1e3 * tol


def test_finite_difference_at_small_r_equals_exact_product():
    _model, _w_opt, architect, train, valid = tiny_search(hvp="fd", hvp_r=1e-5)
    w_prime, _c, _ = architect.virtual_weights(train, LR)
    _, v = architect._valid_grads_at(w_prime, valid)
    fd = flat(architect.hvp_fd(v, train))
    exact = flat(architect.hvp_exact(v, train))
    assert exact.norm() > 0
    assert (fd - exact).norm() < 1e-6 * exact.norm()
    # And the whole second-order gradient agrees between the two modes.
    g_fd = flat(architect.unrolled_grad(train, valid, LR, hvp="fd"))
    g_exact = flat(architect.unrolled_grad(train, valid, LR, hvp="exact"))
    assert (g_fd - g_exact).norm() < 1e-7 * g_exact.norm()


def test_finite_difference_default_r_is_the_papers_central_difference_and_weights_do_not_move():
    model, _w_opt, architect, train, valid = tiny_search(hvp="fd", hvp_r=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    w_prime, _c, _ = architect.virtual_weights(train, LR)
    _, v = architect._valid_grads_at(w_prime, valid)
    ours = architect.hvp_fd(v, train)
    # By hand (paper eq. 8): eps = 0.01 / ||v||, (grad_a L_train(w + eps v) - grad_a L_train(w - eps v)) / 2 eps.
    eps = 0.01 / flat(v).norm()
    weights = dict(model.named_weight_parameters())
    alphas = {"alphas_normal": model.alphas_normal, "alphas_reduce": model.alphas_reduce}

    def grad_alpha_at(sign):
        w = {n: p.detach() + sign * eps * vi for (n, p), vi in zip(weights.items(), v)}
        return torch.autograd.grad(loss_of(model, {**w, **alphas}, train), list(alphas.values()))

    by_hand = [(gp - gm) / (2 * eps) for gp, gm in zip(grad_alpha_at(+1), grad_alpha_at(-1))]
    torch.testing.assert_close(flat(ours), flat(by_hand), rtol=1e-10, atol=1e-12)
    architect.step(train, valid, LR)
    for n, p in model.named_parameters():
        if not n.startswith("alphas_"):
            assert torch.equal(p, before[n]), f"{n} changed during the alpha step"
    assert not torch.equal(model.alphas_normal, before["alphas_normal"])


def test_first_order_gradient_is_dlval_dalpha():
    model, _w_opt, architect, train, valid = tiny_search(unrolled=False)
    ours = architect.grad(train, valid, LR)
    loss = F.cross_entropy(model(valid[0]), valid[1])
    ref = torch.autograd.grad(loss, model.arch_parameters())
    torch.testing.assert_close(flat(ours), flat(ref), rtol=1e-12, atol=1e-14)
    # The alpha step leaves no gradient on the weights (none was computed).
    model.zero_grad(set_to_none=True)
    architect.step(train, valid, LR)
    assert all(p.grad is None for p in model.weight_parameters())


def test_alpha_step_is_adam_with_the_papers_settings():
    _model, _w_opt, architect, _train, _valid = tiny_search(unrolled=False)
    opt = architect.arch_optimizer
    assert isinstance(opt, torch.optim.Adam)
    group = opt.param_groups[0]
    assert group["betas"] == (0.5, 0.999) and group["weight_decay"] == 1e-3 and group["lr"] == 3e-4


def test_weight_step_is_sgd_with_momentum_weight_decay_and_clipping():
    model, w_opt, _architect, train, _valid = tiny_search()
    clip = 1e-3  # small enough to be active
    weights = dict(model.named_weight_parameters())
    w0 = {n: p.detach().clone() for n, p in weights.items()}
    bufs = {n: w_opt.state[p]["momentum_buffer"].clone() for n, p in weights.items()}
    loss = F.cross_entropy(model(train[0]), train[1])
    grads = torch.autograd.grad(loss, list(weights.values()))
    norm = flat(grads).norm()
    assert norm > clip
    scale = clip / (norm + 1e-6)
    model.zero_grad(set_to_none=True)
    weight_step(model, w_opt, *train, grad_clip=clip)
    for (n, p), g in zip(weights.items(), grads):
        d = g * scale + WD * w0[n]
        buf = MOMENTUM * bufs[n] + d
        torch.testing.assert_close(p.detach(), w0[n] - LR * buf, rtol=1e-10, atol=1e-12)
    assert all(a.grad is None for a in model.arch_parameters())


@pytest.mark.parametrize("hvp", ["fd", "exact"])
def test_hvp_agreement_reports_cosine(hvp):
    _model, _w_opt, architect, train, valid = tiny_search(hvp=hvp, hvp_r=1e-5)
    stats = architect.hvp_agreement(train, valid, LR)
    assert stats["hvp_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert 0 < stats["implicit_ratio"]


@pytest.mark.parametrize("unrolled, hvp", [(False, "fd"), (True, "fd"), (True, "exact")])
def test_channels_last_fast_path_matches_the_plain_path(unrolled, hvp):
    plain = tiny_search(unrolled=unrolled, hvp=hvp, channels_last="off")
    fast = tiny_search(unrolled=unrolled, hvp=hvp, channels_last="on")
    model_p, _, arch_p, train, valid = plain
    model_f, _, arch_f, _, _ = fast
    cl = torch.channels_last
    train_f = (train[0].contiguous(memory_format=cl), train[1])
    valid_f = (valid[0].contiguous(memory_format=cl), valid[1])
    torch.testing.assert_close(model_f(valid_f[0]), model_p(valid[0]), rtol=1e-10, atol=1e-12)
    g_plain = flat(arch_p.grad(train, valid, LR))
    g_fast = flat(arch_f.grad(train_f, valid_f, LR))
    torch.testing.assert_close(g_fast, g_plain, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("unrolled, hvp", [(False, "fd"), (True, "fd"), (True, "exact")])
def test_lean_memory_and_flipped_backward_match_plain_operations(unrolled, hvp):
    model_p, _, arch_p, train, valid = tiny_search(unrolled=unrolled, hvp=hvp, lean_memory=False,
                                                   flip_conv_backward=False)
    model_l, _, arch_l, _, _ = tiny_search(unrolled=unrolled, hvp=hvp)
    for cls in (lean.LeanBatchNorm2d, lean.LeanMaxPool2d, fastconv.FlippedBackwardConv2d):
        assert any(isinstance(m, cls) for m in model_l.modules())
        assert not any(isinstance(m, cls) for m in model_p.modules())
    torch.testing.assert_close(flat(arch_l.grad(train, valid, LR)), flat(arch_p.grad(train, valid, LR)),
                               rtol=1e-10, atol=1e-13)
    for (n, b_l), b_p in zip(model_l.named_buffers(), model_p.buffers()):
        torch.testing.assert_close(b_l, b_p, rtol=1e-12, atol=1e-15, msg=lambda m, n=n: f"{n}: {m}")


def test_call_with_substitutes_only_when_a_tensor_differs(monkeypatch):
    """``call_with`` is ``functional_call``; with the model's own tensors it calls the model directly
    (nothing to substitute), with any other tensor it substitutes as ``functional_call`` does."""
    from torch import nn

    from dartsnas.search import architect as arch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))
    x = torch.randn(4, 3)
    w = torch.randn(2, 3)
    expected = functional_call(model, {"0.weight": w}, (x,))
    assert not torch.equal(expected, model(x))
    assert torch.equal(arch.call_with(model, {"0.weight": w, "2.bias": model[2].bias}, (x,)), expected)
    assert torch.equal(arch.call_with(model, {"nope": w}, (x,)), functional_call(model, {"nope": w}, (x,)))

    def refuse(*args, **kwargs):
        raise AssertionError("functional_call with the model's own tensors")

    monkeypatch.setattr(arch, "functional_call", refuse)
    out = arch.call_with(model, dict(model.named_parameters()), (x,))
    assert torch.equal(out, model(x))
    out.sum().backward()
    assert model[0].weight.grad is not None
