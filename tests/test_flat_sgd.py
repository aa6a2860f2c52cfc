"""SGD and gradient clipping on flat tensors (flat_sgd.py) against torch.optim.SGD and clip_grad_norm_."""

from __future__ import annotations

import copy
import io

import torch
from torch import nn

from dartsnas.flat_sgd import FlatSGD


def _params() -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 3, 3, 3), (4,), (5, 2), (8, 1, 5, 5), (3, 4, 1, 1)]
    out = []
    for shape in shapes:
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        if t.dim() == 4:  # the search's weights are channels-last on the CPU
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(nn.Parameter(t))
    return out


def _grads(params: list[nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        new = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if p.grad is None:
            p.grad = new
        else:  # in place: FlatSGD's gradients stay its views
            p.grad.copy_(new)


def _run(opt: torch.optim.Optimizer, params: list[nn.Parameter], steps: range, clip: float | None = 1.5) -> None:
    for step in steps:
        opt.zero_grad(set_to_none=not isinstance(opt, FlatSGD))
        _grads(params, step)
        if clip is not None:
            if isinstance(opt, FlatSGD):
                norm = opt.clip_grad_norm_(clip)
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
            assert torch.isfinite(norm)
        opt.step()
        for group in opt.param_groups:
            group["lr"] *= 0.9  # a schedule


def _same(a: list[nn.Parameter], b: list[nn.Parameter]) -> None:
    for p, q in zip(a, b):
        assert p.shape == q.shape and p.stride() == q.stride()
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_matches_torch_sgd_with_clipping():
    """Weight decay, momentum (the first buffer being the gradient), clipping and a changing
    learning rate give torch's values in float64; every weight keeps its shape and memory format."""
    ref, flat = _params(), _params()
    sgd = torch.optim.SGD(ref, 0.1, momentum=0.9, weight_decay=3e-4)
    fsgd = FlatSGD(flat, 0.1, momentum=0.9, weight_decay=3e-4)
    _run(sgd, ref, range(5))
    _run(fsgd, flat, range(5))
    _same(ref, flat)
    assert fsgd._intact(buffers=True)  # still on the flat tensors
    assert len({p.untyped_storage().data_ptr() for p in flat}) == 1
    assert all(p.data_ptr() % 64 == 0 for p in flat)  # each weight aligned as an allocation of its own
    for clip in (None, 100.0):  # no clipping; a norm under the threshold
        r, f = _params(), _params()
        _run(torch.optim.SGD(r, 0.05, momentum=0.9), r, range(3), clip)
        _run(FlatSGD(f, 0.05, momentum=0.9), f, range(3), clip)
        _same(r, f)


def test_state_dict_is_sgds_both_ways():
    """A FlatSGD checkpoint resumes in torch.optim.SGD and the other way round, identically."""
    ref, flat = _params(), _params()
    sgd = torch.optim.SGD(ref, 0.1, momentum=0.9, weight_decay=1e-3)
    fsgd = FlatSGD(flat, 0.1, momentum=0.9, weight_decay=1e-3)
    _run(sgd, ref, range(3))
    _run(fsgd, flat, range(3))
    buf = io.BytesIO()
    torch.save({"flat": fsgd.state_dict(), "sgd": sgd.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    assert list(saved["flat"]["state"]) == list(saved["sgd"]["state"])
    # Each side continues from the other's optimiser state (the weights are equal to rounding).
    ref2, flat2 = copy.deepcopy(flat), copy.deepcopy(ref)
    sgd2 = torch.optim.SGD(ref2, 0.1, momentum=0.9, weight_decay=1e-3)
    sgd2.load_state_dict(saved["flat"])
    fsgd2 = FlatSGD(flat2, 0.1, momentum=0.9, weight_decay=1e-3)
    fsgd2.load_state_dict(saved["sgd"])
    assert fsgd2._intact(buffers=True)  # the loaded buffers were put into the flat tensor
    _run(sgd, ref, range(3, 6))
    _run(sgd2, ref2, range(3, 6))
    _run(fsgd2, flat2, range(3, 6))
    _same(ref, ref2)
    _same(ref, flat2)


def test_a_broken_layout_runs_as_sgd_then_is_rebuilt():
    """A gradient replaced by another tensor, a weight given new memory, cleared state: that step runs
    as torch.optim.SGD (same values), after which the flat tensors serve again."""
    ref, flat = _params(), _params()
    sgd = torch.optim.SGD(ref, 0.1, momentum=0.9, weight_decay=1e-3)
    fsgd = FlatSGD(flat, 0.1, momentum=0.9, weight_decay=1e-3)
    _run(sgd, ref, range(2))
    _run(fsgd, flat, range(2))
    for breaking in range(3):
        if breaking == 0:
            flat[2].grad = flat[2].grad.clone()
            ref[2].grad = ref[2].grad.clone()
        elif breaking == 1:
            flat[0].data = flat[0].data.clone()
        else:
            fsgd.state.clear()
            sgd.state.clear()
        assert not fsgd._intact(buffers=True)
        for opt, ps in ((sgd, ref), (fsgd, flat)):
            _grads(ps, 10 + breaking)
            opt.step()
        assert fsgd._intact(buffers=True)
        _same(ref, flat)
        _run(sgd, ref, range(20 + 2 * breaking, 22 + 2 * breaking))
        _run(fsgd, flat, range(20 + 2 * breaking, 22 + 2 * breaking))
        _same(ref, flat)


def test_gradients_are_zeroed_not_dropped():
    """zero_grad keeps the gradients (zeros, in the flat tensor): a weight that receives no gradient
    still decays and keeps its momentum, as with zero_grad(set_to_none=False) in torch.optim.SGD."""
    ref, flat = _params(), _params()
    sgd = torch.optim.SGD(ref, 0.1, momentum=0.9, weight_decay=0.1)
    fsgd = FlatSGD(flat, 0.1, momentum=0.9, weight_decay=0.1)
    _run(sgd, ref, range(2))
    _run(fsgd, flat, range(2))
    sgd.zero_grad(set_to_none=False)
    fsgd.zero_grad()
    assert all(p.grad is not None and not p.grad.any() for p in flat)
    sgd.step()
    fsgd.step()
    _same(ref, flat)


def test_other_settings_are_plain_sgd():
    """Nesterov momentum, several parameter groups: torch.optim.SGD's own step."""
    ref, flat = _params(), _params()
    sgd = torch.optim.SGD(ref, 0.1, momentum=0.9, nesterov=True)
    fsgd = FlatSGD(flat, 0.1, momentum=0.9)
    fsgd.param_groups[0]["nesterov"] = True
    _run(sgd, ref, range(3))
    _run(fsgd, flat, range(3))
    _same(ref, flat)
    assert fsgd._flat is None
