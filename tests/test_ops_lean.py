"""Memory-lean batch norm and max pooling (ops/lean.py): the same numbers as PyTorch's, less kept."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dartsnas.ops import lean
from dartsnas.search.cnn import SearchNetwork

FORMATS = [torch.contiguous_format, torch.channels_last]


def _pair(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    plain = module.double()
    return plain, lean.make_lean(copy.deepcopy(plain))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_keeping_its_output_matches_batch_norm(fmt, momentum):
    torch.manual_seed(0)
    plain, lean_bn = _pair(nn.BatchNorm2d(5, affine=False, momentum=momentum))
    assert isinstance(lean_bn, lean.LeanBatchNorm2d)
    for _ in range(2):  # the second pass sees non-trivial running statistics
        x = (3 * torch.randn(4, 5, 6, 7, dtype=torch.float64) + 1).contiguous(memory_format=fmt)
        g = torch.randn(4, 5, 6, 7, dtype=torch.float64)
        xp, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
        yp, yl = plain(xp), lean_bn(xl)
        torch.testing.assert_close(yl, yp, rtol=0, atol=1e-14)
        (dp,), (dl,) = torch.autograd.grad(yp, xp, g), torch.autograd.grad(yl, xl, g)
        torch.testing.assert_close(dl, dp, rtol=1e-12, atol=1e-14)
    for (name, b_p), b_l in zip(plain.named_buffers(), lean_bn.buffers()):
        torch.testing.assert_close(b_l, b_p, rtol=1e-14, atol=0, msg=name)
    plain.eval(), lean_bn.eval()
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    # Channels-last with 5 channels takes the wide batch norm (ops/widebn.py): running statistics equal
    # up to rounding, hence eval-mode outputs too.
    exact = fmt == torch.contiguous_format
    torch.testing.assert_close(lean_bn(x), plain(x), rtol=0 if exact else 1e-14, atol=0 if exact else 1e-15)


def test_batch_norm_gradient_against_finite_differences():
    torch.manual_seed(1)
    bn = lean.make_lean(nn.BatchNorm2d(3, affine=False).double())
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bn, (x,))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool_recomputing_its_argmax_matches_max_pool(fmt, stride):
    torch.manual_seed(2)
    plain, lean_pool = _pair(nn.MaxPool2d(3, stride=stride, padding=1))
    assert isinstance(lean_pool, lean.LeanMaxPool2d)
    # Rounded values: many ties inside a window, where the choice of the argmax matters.
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64).round().contiguous(memory_format=fmt)
    xp, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp, yl = plain(xp), lean_pool(xl)
    assert torch.equal(yl, yp)
    g = torch.randn_like(yp)
    (dp,), (dl,) = torch.autograd.grad(yp, xp, g), torch.autograd.grad(yl, xl, g)
    assert torch.equal(dl, dp)


def test_a_second_derivative_through_lean_batch_norm_raises_and_plain_restores_it():
    torch.manual_seed(4)
    bn = lean.make_lean(nn.BatchNorm2d(2, affine=False).double())
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    other = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    # Even when only another input's second derivative is asked for (as the exact Hessian-vector
    # product asks for the alphas'), the graph through the batch norm must not be built silently.
    y = (bn(x) * other).pow(3).sum()
    with pytest.raises(RuntimeError, match="plain"):
        torch.autograd.grad(y, x, create_graph=True)
    with lean.plain():
        assert not lean.enabled()
        y = (bn(x) * other).pow(3).sum()
    assert lean.enabled()
    (g,) = torch.autograd.grad(y, x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), other)  # plain operations: second derivatives work
    assert h.abs().sum() > 0
    with lean.using(False):
        assert not lean.enabled()
        with lean.using(True):
            assert lean.enabled()
        assert not lean.enabled()


@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool_second_derivative_is_exact(stride):
    torch.manual_seed(5)
    pool = lean.LeanMaxPool2d(3, stride=stride, padding=1)
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: pool(t) * pool(t), (x,))


def test_other_settings_run_the_plain_operations():
    bn = lean.make_lean(nn.BatchNorm2d(2, affine=True))
    assert type(bn) is nn.BatchNorm2d  # an affine output is not what the mixing product keeps
    pool = lean.LeanMaxPool2d(3, stride=1, padding=1, ceil_mode=True)
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    assert "MaxPool2DWithIndices" in type(pool(x).grad_fn).__name__


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


def test_search_network_same_gradients_and_less_kept_for_backward():
    torch.manual_seed(3)
    plain = SearchNetwork(C=4, num_classes=3, layers=3, lean_memory=False).double()
    lean_net = SearchNetwork(C=4, num_classes=3, layers=3, lean_memory=True).double()
    lean_net.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    losses = [F.cross_entropy(m(x), y) for m in (plain, lean_net)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-13, atol=0)
    grads = [torch.autograd.grad(loss, list(m.parameters())) for loss, m in zip(losses, (plain, lean_net))]
    for (name, _), gp, gl in zip(plain.named_parameters(), *grads):
        torch.testing.assert_close(gl, gp, rtol=1e-10, atol=1e-14, msg=name)
    # What autograd keeps: every edge's pooling indices and its operations' pre-norm outputs go.
    assert _saved_bytes(lean_net, x) < 0.8 * _saved_bytes(plain, x)
