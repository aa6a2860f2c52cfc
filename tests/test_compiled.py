"""``--compile``: the search cell's node kernels through torch.compile, and the fallback without it."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from dartsnas.engine.search_rnn import RNNSearchConfig, TextBatch, build_search, search_step
from dartsnas.ops import compiled as compiled_mod
from dartsnas.ops.compiled import Kernel
from dartsnas.search import rnn as rnn_search

NTOKEN, B, T, H = 11, 3, 4, 4

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")),
    reason="no C++ compiler on this machine: torch.compile cannot build CPU kernels (install g++)")
NO_DROPOUT = {"dropout": 0.0, "dropouth": 0.0, "dropoutx": 0.0, "dropouti": 0.0, "dropoute": 0.0}


def _search(compile: bool, unrolled: bool, hvp: str):
    torch.manual_seed(3)
    cfg = RNNSearchConfig(emsize=H, nhid=H, nhidlast=H, batch_size=B, bptt=T, learning_rate=5.0, unrolled=unrolled,
                          hvp=hvp, beta=0.0, compile=compile, **NO_DROPOUT)
    model, w_opt, architect = build_search(cfg, NTOKEN, torch.device("cpu"), dtype=torch.float64)
    with torch.no_grad():
        model.alphas.normal_(0, 0.5)
    gen = torch.Generator().manual_seed(5)

    def batch(seed):
        tokens = torch.randint(0, NTOKEN, (T + 1, B), generator=gen)
        return TextBatch(tokens[:-1], tokens[1:], torch.randn(B, H, dtype=torch.float64, generator=gen), seed)

    return model, w_opt, architect, cfg, batch(1), batch(2)


def _after_step(compile: bool, unrolled: bool, hvp: str) -> dict[str, torch.Tensor]:
    model, w_opt, architect, cfg, train, valid = _search(compile, unrolled, hvp)
    assert model.rnns[0].compile is compile
    search_step(model, w_opt, architect, train, valid, cfg.learning_rate, cfg)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@needs_compiler
@pytest.mark.parametrize("unrolled,hvp", [(True, "fd"), (True, "exact")])
def test_compiled_node_kernels_give_the_eager_search_step(unrolled, hvp):
    # One full step (alpha step of the given order, then the weight step) runs the compiled forward
    # and first-order backward of every node; the exact Hessian-vector product's double backward
    # takes the eager differentiable path. Both must land on the eager step's parameters.
    for kernel in (rnn_search._FORWARD, rnn_search._BACKWARD):
        kernel.reset()
    eager = _after_step(False, unrolled, hvp)
    fused = _after_step(True, unrolled, hvp)
    for kernel in (rnn_search._FORWARD, rnn_search._BACKWARD):
        assert kernel.failed is None, f"compilation failed here, so the compiled path went untested: {kernel.failed}"
        assert kernel.active
    for name in eager:
        torch.testing.assert_close(fused[name], eager[name], rtol=1e-10, atol=1e-12, msg=name)


@needs_compiler
def test_compiled_node_kernels_match_the_plain_functions_with_few_compilations(monkeypatch):
    # Every node of a search (1..8 incoming edges, mixing weights at a different offset of the
    # cell's alphas, training and validation batch sizes) must reuse a few compiled graphs: past
    # the limit, compilation would give up (here: fail, so the kernel reports it).
    import torch._dynamo.config as dynamo_config

    monkeypatch.setattr(dynamo_config, "recompile_limit", 3)
    monkeypatch.setattr(dynamo_config, "fail_on_recompile_limit_hit", True)
    ops = ("tanh", "relu", "sigmoid", "identity")
    torch._dynamo.reset()
    for kernel in (rnn_search._FORWARD, rnn_search._BACKWARD):
        kernel.reset()
    gen = torch.Generator().manual_seed(2)
    alphas = torch.rand(36, len(ops), dtype=torch.float64, generator=gen, requires_grad=True)
    offset = 0
    for edges, batch in ((1, B), (2, B), (3, B), (5, B + 2), (8, 2 * B)):
        st = torch.randn(edges, batch, H, dtype=torch.float64, generator=gen, requires_grad=edges % 2 == 0)
        ch = 3 * torch.randn(edges, batch, 2 * H, dtype=torch.float64, generator=gen)
        p = alphas[offset:offset + edges]
        offset += edges
        ds = torch.randn(batch, H, dtype=torch.float64, generator=gen)
        with torch.no_grad():
            fused = rnn_search.MixedNode.apply(st, ch, p, ops, True)
            plain = rnn_search._node_plain(st, ch, p, ops)
        torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-13)
        kernel_b = rnn_search._BACKWARD(*rnn_search._kernel_inputs(st, ch, p), ops, ds)
        for a, b in zip(kernel_b, rnn_search._backward_fast(st.detach(), ch, p.detach(), ops, ds)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    for kernel in (rnn_search._FORWARD, rnn_search._BACKWARD):
        assert kernel.active, kernel.failed


def test_a_kernel_that_fails_to_compile_warns_once_and_runs_uncompiled(monkeypatch, caplog):
    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls.append(args)
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nlong details")
        return run

    monkeypatch.setattr(compiled_mod.torch, "compile", broken_compile)
    kernel = Kernel(lambda x: x * 2, "a doubling")
    x = torch.arange(3.0)
    assert not kernel.active
    with caplog.at_level(logging.WARNING, logger="dartsnas"):
        assert torch.equal(kernel(x), x * 2)
        assert torch.equal(kernel(x), x * 2)
    assert len(calls) == 1 and not kernel.active  # given up after the first failure
    assert "no working C++ compiler" in kernel.failed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "--compile" in warnings[0] and "a doubling" in warnings[0]
    assert "\n" not in warnings[0]
    assert torch.equal(kernel(x, compiled=False), x * 2)


def test_an_error_of_the_computation_itself_still_raises(monkeypatch):
    # Falling back must not hide a real error: the plain function raises it again.
    monkeypatch.setattr(compiled_mod.torch, "compile", lambda fn, **kw: fn)
    kernel = Kernel(lambda a, b: a @ b, "a product")
    with pytest.raises(RuntimeError):
        kernel(torch.ones(2, 3), torch.ones(2, 3))
