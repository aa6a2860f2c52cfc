"""ops/sequence.py: products packed once per sequence, weight gradient gathered into one product."""

from __future__ import annotations

import weakref

import pytest
import torch

from dartsnas.genotype import get_genotype
from dartsnas.models.rnn import RNNModel
from dartsnas.ops import sequence
from dartsnas.ops.sequence import can_pack, sequence_product

NTOKEN, NHID, B, T = 23, 6, 4, 7


def _products(dtype, pack, weight_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 9, dtype=dtype, generator=gen).requires_grad_(weight_grad)
    xs = [torch.randn(3, 5, dtype=dtype, generator=gen).requires_grad_() for _ in range(T)]
    g = torch.randn(T, 3, 9, dtype=dtype, generator=gen)
    return w, xs, g


def _recurrence(w, xs, product):
    # A recurrence, so that the products are differentiated in reverse order of their forward.
    h = torch.zeros_like(xs[0] @ w)
    outs = []
    for x in xs:
        h = torch.tanh(product(x) + 0.5 * h)
        outs.append(h)
    return torch.stack(outs)


def test_gradients_equal_autograd_in_float64():
    w, xs, g = _products(torch.float64, pack=True)
    ref = torch.autograd.grad(_recurrence(w, xs, lambda x: x @ w), [w, *xs], g)
    got = torch.autograd.grad(_recurrence(w, xs, sequence_product(w)), [w, *xs], g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.skipif(not can_pack(torch.zeros(1)), reason="this PyTorch build has no oneDNN: nothing is packed")
def test_packed_float32_is_as_accurate_as_pytorch_products():
    w64, xs64, g64 = _products(torch.float64, pack=False)
    exact = torch.autograd.grad(_recurrence(w64, xs64, lambda x: x @ w64), [w64, *xs64], g64)
    w, xs = w64.detach().float().requires_grad_(), [x.detach().float().requires_grad_() for x in xs64]
    plain = torch.autograd.grad(_recurrence(w, xs, lambda x: x @ w), [w, *xs], g64.float())
    seq = sequence.sequence_product(w)
    packed = torch.autograd.grad(_recurrence(w, xs, seq), [w, *xs], g64.float())
    eps = torch.finfo(torch.float32).eps
    for p, q, e in zip(packed, plain, exact):
        scale = e.abs().max().item()
        err_packed = (p.double() - e).abs().max().item()
        err_plain = (q.double() - e).abs().max().item()
        assert err_packed <= 10 * err_plain + 10 * eps * scale


def test_the_weight_gradient_arrives_once_per_backward_and_accumulates():
    w, xs, g = _products(torch.float64, pack=True)
    seen = []
    w.register_hook(lambda grad: seen.append(grad.clone()))
    out = _recurrence(w, xs, sequence_product(w))
    out.backward(g, retain_graph=True)
    out.backward(g)
    assert len(seen) == 2  # one gathered gradient per backward, not one per time step
    torch.testing.assert_close(seen[0], seen[1])
    ref = torch.autograd.grad(_recurrence(w, xs, lambda x: x @ w), w, g)[0]
    torch.testing.assert_close(w.grad, 2 * ref)


def test_a_weight_without_gradient_and_no_grad_mode():
    w, xs, g = _products(torch.float64, pack=True, weight_grad=False)
    got = torch.autograd.grad(_recurrence(w, xs, sequence_product(w)), xs, g)
    ref = torch.autograd.grad(_recurrence(w, xs, lambda x: x @ w), xs, g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        product = sequence_product(w.requires_grad_())
        out = product(xs[0])
    assert not out.requires_grad
    torch.testing.assert_close(out, xs[0] @ w)


def test_a_second_derivative_raises_instead_of_being_wrong():
    w, xs, g = _products(torch.float64, pack=True)
    out = _recurrence(w, xs, sequence_product(w))
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(out, [w, *xs], g, create_graph=True)


def test_the_sequence_state_is_freed_with_its_graph():
    w, xs, g = _products(torch.float64, pack=True)
    product = sequence_product(w)
    [seq] = [c.cell_contents for c in product.__closure__ if isinstance(c.cell_contents, sequence._Sequence)]
    state = weakref.ref(seq)
    del seq
    out = _recurrence(w, xs, product)
    out.backward(g)
    del out, product
    assert state() is None  # no reference cycle keeps the packed weights alive


def _model(packed, dtype):
    torch.manual_seed(0)
    return RNNModel(NTOKEN, NHID, NHID, NHID, 0.3, 0.2, 0.3, 0.2, 0.1, genotype=get_genotype("DARTS", kind="rnn"),
                    packed=packed).to(dtype)


def test_packed_cell_equals_the_plain_cell_with_dropout_in_float64():
    tokens = torch.randint(0, NTOKEN, (T, B))
    results = []
    for packed in (False, True):
        model = _model(packed, torch.float64)
        model.train()
        out = model(tokens, model.init_hidden(B), torch.Generator().manual_seed(5))
        loss = out.logits.logsumexp(-1).mean() + out.raw_output.pow(2).mean()
        loss.backward()
        results.append([out.logits.detach(), out.hidden.detach(), *[p.grad for p in model.parameters()]])
        model.eval()
        with torch.no_grad():
            results[-1].append(model(tokens, model.init_hidden(B)).logits)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not can_pack(torch.zeros(1)), reason="this PyTorch build has no oneDNN: nothing is packed")
def test_packing_is_lazy_and_skipped_for_single_rows():
    w = torch.randn(5, 9)
    seq = sequence._Sequence(w, pack=True)
    one, many = torch.randn(1, 5), torch.randn(4, 5)
    torch.testing.assert_close(seq.product(one), one @ w)
    assert not seq._packed  # one row: a matrix-vector product, cheaper than packing
    torch.testing.assert_close(seq.product(many), many @ w)
    assert list(seq._packed) == [False]  # a forward alone packs only its weight
    g = torch.randn(4, 9)
    torch.testing.assert_close(seq.input_grad(g), g @ w.t())
    assert sorted(seq._packed) == [False, True]
    assert sequence._Sequence(w, pack=False).product(many) is not None
    assert sequence._Sequence(w.double(), pack=True)._pack is False  # float64: PyTorch's products
