"""``checkpoint_cells``: each search cell recomputed in the backward gives the same numbers with
much less kept for the backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.func import functional_call

import dartsnas.search.cnn as search_cnn
from dartsnas.cli import main
from dartsnas.data.images import ImageData, ImageSet
from dartsnas.engine.search_cnn import SearchConfig, build_search, resume_config, weight_step
from dartsnas.ops import lean
from dartsnas.search.cnn import SearchNetwork

LR = 0.5  # a large xi makes the implicit (Hessian) term of the second-order gradient large


def pair(**kw) -> tuple[SearchNetwork, SearchNetwork]:
    """The same tiny network (float64) without and with checkpointed cells, alphas off uniform."""
    args = {"C": 4, "num_classes": 3, "layers": 3, "steps": 2, "multiplier": 2}
    args.update(kw)
    torch.manual_seed(1)
    plain = SearchNetwork(**args).double()
    with torch.no_grad():
        for a in plain.arch_parameters():
            a.normal_(0, 0.5)
    ckpt = SearchNetwork(**args, checkpoint_cells=True).double()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.checkpoint_cells and not plain.checkpoint_cells
    return plain, ckpt


def batch(n: int = 4, size: int = 8, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, dtype=torch.float64, generator=g), torch.randint(0, 3, (n,), generator=g)


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def assert_same_buffers(a: torch.nn.Module, b: torch.nn.Module) -> None:
    bufs_a, bufs_b = dict(a.named_buffers()), dict(b.named_buffers())
    assert bufs_a.keys() == bufs_b.keys() and bufs_a
    for name, buf in bufs_a.items():
        assert torch.equal(buf, bufs_b[name]), f"buffer {name} differs"


def test_values_and_gradients_match():
    plain, ckpt = pair()
    x, y = batch()
    out_p, out_c = plain(x), ckpt(x)
    close(out_c, out_p)
    params_p, params_c = list(plain.parameters()), list(ckpt.parameters())
    g_p = torch.autograd.grad(F.cross_entropy(out_p, y), params_p)
    g_c = torch.autograd.grad(F.cross_entropy(out_c, y), params_c)
    for (name, _), gp, gc in zip(plain.named_parameters(), g_p, g_c):
        close(gc, gp)
    # Both alphas among them, with a real gradient.
    names = [n for n, _ in plain.named_parameters()]
    for alpha in ("alphas_normal", "alphas_reduce"):
        assert g_c[names.index(alpha)].abs().sum() > 0


def test_recomputation_uses_the_substituted_weights():
    """Under functional_call the module's own parameters are back in place by the time the backward
    recomputes the cell: the recomputation must still use the substituted tensors."""
    plain, ckpt = pair()
    x, y = batch()
    g = torch.Generator().manual_seed(7)
    shifted = {n: (p.detach() + 0.3 * torch.randn(p.shape, dtype=p.dtype, generator=g)).requires_grad_()
               for n, p in plain.named_parameters()}
    grads = []
    for model in (plain, ckpt):
        params = {n: t.detach().clone().requires_grad_() for n, t in shifted.items()}
        loss = F.cross_entropy(functional_call(model, params, (x,)), y)
        grads.append(torch.autograd.grad(loss, list(params.values())))
    close(flat(grads[1]), flat(grads[0]))
    # The substitution matters: the module's own weights give another gradient.
    own = torch.autograd.grad(F.cross_entropy(plain(x), y), list(plain.parameters()))
    assert (flat(own) - flat(grads[0])).norm() > 1e-3 * flat(grads[0]).norm()


def test_batch_norm_statistics_are_updated_once():
    plain, ckpt = pair()
    x, y = batch()
    F.cross_entropy(plain(x), y).backward()
    F.cross_entropy(ckpt(x), y).backward()
    assert_same_buffers(ckpt, plain)
    assert int(ckpt.cells[0].preprocess1.op[-1].num_batches_tracked) == 1


def test_batch_norm_statistics_with_a_retained_graph_differentiated_twice():
    plain, ckpt = pair()
    x, y = batch()
    F.cross_entropy(plain(x), y).backward()
    loss = F.cross_entropy(ckpt(x), y)
    g1 = torch.autograd.grad(loss, list(ckpt.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(loss, list(ckpt.parameters()))
    close(flat(g2), flat(g1))
    assert_same_buffers(ckpt, plain)


def test_no_grad_evaluation_does_not_checkpoint(monkeypatch):
    plain, ckpt = pair()
    x, _ = batch()

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint called without a graph to build")

    monkeypatch.setattr(search_cnn, "checkpoint", refuse)
    for mode in ("eval", "train"):
        getattr(plain, mode)()
        getattr(ckpt, mode)()
        with torch.no_grad():
            close(ckpt(x), plain(x))
        assert_same_buffers(ckpt, plain)
    # A graph is needed by nothing: no weight, alpha or input requires a gradient.
    for p in ckpt.parameters():
        p.requires_grad_(False)
    ckpt(x)


def tiny_search(checkpoint_cells: bool, hvp: str):
    torch.manual_seed(3)
    cfg = SearchConfig(init_channels=4, layers=3, nodes=2, learning_rate=LR, unrolled=True, hvp=hvp, epochs=4,
                       channels_last="off", checkpoint_cells=checkpoint_cells)
    data = ImageData("t", ImageSet(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)),
                     None, num_classes=3, mean=(0.5,) * 3, std=(0.25,) * 3, pad=0, flip=False)
    model, w_opt, _, architect = build_search(cfg, data, torch.device("cpu"), dtype=torch.float64)
    assert model.checkpoint_cells is checkpoint_cells
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_(0, 0.5)
    train, valid = batch(seed=4), batch(seed=5)
    # One real weight step first: the virtual step then uses non-zero momentum buffers.
    weight_step(model, w_opt, *train, grad_clip=5.0)
    return model, architect, train, valid


@pytest.mark.parametrize("hvp", ["fd", "exact"])
def test_second_order_alpha_gradient_matches(hvp):
    model_p, arch_p, train, valid = tiny_search(False, hvp)
    model_c, arch_c, _, _ = tiny_search(True, hvp)
    assert_same_buffers(model_c, model_p)
    g_p = flat(arch_p.unrolled_grad(train, valid, LR))
    g_c = flat(arch_c.unrolled_grad(train, valid, LR))
    assert g_p.norm() > 0
    close(g_c, g_p)
    assert_same_buffers(model_c, model_p)


def test_exact_hessian_vector_products_match():
    """Double backward through the recomputed cells, including a graph built under lean.plain() and
    differentiated outside it (the recomputation must build the forward's plain graph)."""
    model_p, arch_p, train, valid = tiny_search(False, "exact")
    model_c, arch_c, _, _ = tiny_search(True, "exact")
    vs = []
    for arch in (arch_p, arch_c):
        w_prime, _, _ = arch.virtual_weights(train, LR)
        vs.append(arch._valid_grads_at(w_prime, valid)[1])
    close(flat(vs[1]), flat(vs[0]))
    hv_p = flat(arch_p.hvp_exact(vs[0], train))
    hv_c = flat(arch_c.hvp_exact(vs[1], train))
    assert hv_p.norm() > 0
    close(hv_c, hv_p)
    agree_p, agree_c = arch_p.hvp_agreement(train, valid, LR), arch_c.hvp_agreement(train, valid, LR)
    assert agree_c == pytest.approx(agree_p, rel=1e-9)
    assert_same_buffers(model_c, model_p)


def test_double_backward_of_a_lean_forward_recomputed_under_plain():
    """The other direction: a lean forward whose backward runs inside lean.plain() recomputes the
    lean operations the forward used."""
    plain, ckpt = pair()
    x, y = batch()
    grads = []
    for model in (plain, ckpt):
        loss = F.cross_entropy(model(x), y)
        with lean.plain():
            grads.append(flat(torch.autograd.grad(loss, list(model.parameters()))))
    close(grads[1], grads[0])


def saved_activation_bytes(model: SearchNetwork, x: torch.Tensor) -> int:
    """Bytes kept for the backward by one forward, parameters aside: tensors saved by autograd (the
    innermost hooks win, so a checkpointed cell's own saves are not seen) plus every cell's inputs,
    which a checkpointed cell keeps. Storages are counted once."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        add(t)
        return t

    def keep_inputs(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        for t in args:
            add(t)

    hooks = [cell.register_forward_pre_hook(keep_inputs) for cell in model.cells]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
    finally:
        for h in hooks:
            h.remove()
    return sum(storages.values())


def test_checkpointing_keeps_far_less_for_the_backward():
    torch.manual_seed(0)
    plain = SearchNetwork(C=8, num_classes=3, layers=5)
    ckpt = SearchNetwork(C=8, num_classes=3, layers=5, checkpoint_cells=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 16, 16)
    full, kept = saved_activation_bytes(plain, x), saved_activation_bytes(ckpt, x)
    print(f"kept for the backward: {kept / 2**20:.2f} MiB checkpointed, {full / 2**20:.2f} MiB plain")
    assert 0 < kept < full / 3, (kept, full)


def test_cli_flag_runs_a_second_order_search(tmp_path: Path, capsys):
    save = tmp_path / "run"
    rc = main(["search", "cnn", "--dataset", "digits", "--layers", "3", "--init-channels", "2", "--nodes", "2",
               "--batch_size", "8", "--epochs", "1", "--max_steps", "2", "--eval_batches", "1", "--unrolled",
               "--checkpoint_cells", "--no-plots", "--save", str(save)])
    capsys.readouterr()
    assert rc == 0
    stored = yaml.safe_load((save / "config.yaml").read_text())["config"]
    assert stored["checkpoint_cells"] is True and stored["unrolled"] is True
    # It does not change the mathematics, so a resumed run may switch it off.
    assert resume_config(save, {"checkpoint_cells": False}).checkpoint_cells is False


def test_default_is_off():
    assert SearchConfig().checkpoint_cells is False
    assert SearchNetwork(C=2, num_classes=3, layers=3, steps=2, multiplier=2).checkpoint_cells is False
