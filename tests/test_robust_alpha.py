"""Robust-search options of ``dartsnas search cnn``: beta-DARTS (``--beta_decay``), SDARTS-RS
(``--alpha_noise``) and the per-epoch diagnostics of the derived cells."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dartsnas.engine import search_cnn
from dartsnas.engine.search_cnn import SearchConfig, run
from dartsnas.errors import UserError
from dartsnas.search.alpha_noise import noise_bound, perturbed_weights, project_rows
from dartsnas.search.architect import Architect, VirtualStep
from dartsnas.search.beta_decay import beta_decay_loss, beta_decay_weight
from dartsnas.search.cnn import SearchNetwork
from dartsnas.search.hessian import search_eigenvalue


@pytest.fixture
def tiny_images(tmp_path: Path) -> Path:
    """32 random 8x8 RGB images in 10 classes: two steps of batch 8 per stream and epoch."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8), y=rng.integers(0, 10, 32))
    return path


def tiny(data: Path, save: Path, **kw) -> SearchConfig:
    args = {"dataset": "npz", "data": str(data), "save": str(save), "init_channels": 2, "layers": 3, "nodes": 2,
            "batch_size": 8, "epochs": 2, "eval_batches": 1, "plots": False, "seed": 3}
    args.update(kw)
    return SearchConfig(**args)


def final_alphas(save: Path) -> dict[str, torch.Tensor]:
    model = torch.load(save / "checkpoints" / "last.pt", weights_only=True)["model"]
    return {k: v for k, v in model.items() if k.startswith("alphas_")}


def tiny_architect(unrolled: bool, hvp: str, dirichlet: bool = False) -> tuple[Architect, tuple, tuple]:
    arch, batch, batch_v, _ = tiny_search(unrolled, hvp, dirichlet)
    return arch, batch, batch_v


def tiny_search(unrolled: bool, hvp: str, dirichlet: bool = False) -> tuple[Architect, tuple, tuple, SearchNetwork]:
    torch.manual_seed(0)
    model = SearchNetwork(C=2, num_classes=3, layers=3, steps=2, multiplier=2, lean_memory=False,
                          dirichlet=dirichlet).double()
    model.dirichlet_seed = 11
    with torch.no_grad():
        model.alphas_normal.normal_()
        model.alphas_reduce.normal_()

    def loss_fn(params, batch):
        x, y = batch
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    w_opt = torch.optim.SGD(model.weight_parameters(), 0.1, momentum=0.9)
    arch = Architect(dict(model.named_weight_parameters()),
                     {"alphas_normal": model.alphas_normal, "alphas_reduce": model.alphas_reduce}, loss_fn,
                     torch.optim.Adam(model.arch_parameters(), 1e-3), w_opt, unrolled=unrolled, hvp=hvp,
                     virtual=VirtualStep(0.9, 3e-4))
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen))
    batch_v = (torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen))
    return arch, batch, batch_v, model


# -- beta-DARTS ----------------------------------------------------------------------------------

def test_beta_decay_known_answers():
    # Equal alphas on an edge of n operations: log(n * e^c) = c + log n.
    a = torch.full((3, 8), 0.5, dtype=torch.float64)
    b = torch.zeros(3, 8, dtype=torch.float64)
    assert beta_decay_loss([a, b]).item() == pytest.approx(((0.5 + math.log(8)) + math.log(8)) / 2)
    assert beta_decay_loss([torch.tensor([[0.0, math.log(3.0)]])]).item() == pytest.approx(math.log(4.0))
    assert [beta_decay_weight(2.0, e, 4) for e in range(4)] == [0.0, 0.5, 1.0, 1.5]


def test_beta_decay_gradient_equals_autograd_and_finite_differences():
    gen = torch.Generator().manual_seed(0)
    alphas = [torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    grads = torch.autograd.grad(beta_decay_loss(alphas), alphas)
    for a, g in zip(alphas, grads):  # d/d alpha of mean_edges logsumexp = softmax / (number of edges)
        torch.testing.assert_close(g, F.softmax(a, dim=-1) / 10, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda x, y: beta_decay_loss([x, y]), tuple(alphas))


@pytest.mark.parametrize("unrolled,hvp", [(False, "fd"), (True, "fd"), (True, "exact")])
def test_architect_adds_the_beta_decay_gradient(unrolled, hvp):
    arch, batch, batch_v = tiny_architect(unrolled, hvp)
    plain = arch.grad(batch, batch_v, 0.05)
    lam = 0.7
    arch.alpha_penalty = lambda alphas: lam * beta_decay_loss(alphas)
    regularised = arch.grad(batch, batch_v, 0.05)
    n_edges = sum(a.shape[0] for a in arch.alphas)
    for p, r, a in zip(plain, regularised, arch.alphas):
        torch.testing.assert_close(r - p, lam * F.softmax(a.detach(), dim=-1) / n_edges, rtol=1e-9, atol=1e-12)


def test_beta_decay_off_and_first_epoch_reproduce_plain_darts(tiny_images, tmp_path):
    plain = final_alphas(run(tiny(tiny_images, tmp_path / "plain", epochs=1)).run_dir)
    off = final_alphas(run(tiny(tiny_images, tmp_path / "off", epochs=1, beta_decay=0.0)).run_dir)
    # lambda_0 = 0: the first epoch of a regularised search is plain DARTS, bit for bit.
    first = final_alphas(run(tiny(tiny_images, tmp_path / "first", epochs=3, max_steps=2, beta_decay=5.0)).run_dir)
    for key in plain:
        assert torch.equal(plain[key], off[key]) and torch.equal(plain[key], first[key]), key


def test_beta_decay_changes_later_epochs_and_is_recorded(tiny_images, tmp_path):
    plain = final_alphas(run(tiny(tiny_images, tmp_path / "plain")).run_dir)
    result = run(tiny(tiny_images, tmp_path / "beta", beta_decay=5.0))
    beta = final_alphas(result.run_dir)
    assert not torch.equal(plain["alphas_normal"], beta["alphas_normal"])
    assert "beta_decay: 5.0" in (result.run_dir / "config.yaml").read_text()


# -- SDARTS-RS -----------------------------------------------------------------------------------

def test_projection_and_noise_known_answers():
    w = torch.tensor([[0.5, 0.7, -0.2], [-0.1, -0.3, -0.2], [2.0, 0.0, 0.0]], dtype=torch.float64)
    expected = torch.tensor([[0.5 / 1.2, 0.7 / 1.2, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(project_rows(w), expected, rtol=0, atol=1e-15)
    assert noise_bound(0.3, 0, 50) == pytest.approx(0.03) and noise_bound(0.3, 50, 50) == pytest.approx(0.3)
    assert noise_bound(0.0, 7, 50) == 0.0
    alpha = torch.randn(6, 8, dtype=torch.float64)
    clean = F.softmax(alpha, dim=-1)
    torch.testing.assert_close(perturbed_weights(alpha, 0.0, torch.Generator().manual_seed(0)), clean,
                               rtol=1e-15, atol=1e-15)
    noisy = perturbed_weights(alpha, 0.05, torch.Generator().manual_seed(0))
    again = perturbed_weights(alpha, 0.05, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)  # seeded: the same draw again
    torch.testing.assert_close(noisy.sum(-1), torch.ones(6, dtype=torch.float64))
    assert (noisy >= 0).all() and not torch.allclose(noisy, clean)
    # The draw is U(-0.05, 0.05) from the generator, added to softmax(alpha), then projected.
    delta = (2 * torch.rand(6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 1) * 0.05
    assert delta.abs().max() <= 0.05 and delta.min() < 0 < delta.max()
    torch.testing.assert_close(noisy, project_rows(clean + delta), rtol=0, atol=1e-15)


def test_noise_reaches_the_weight_step_only(tiny_images, tmp_path, monkeypatch):
    seen: list[tuple[bool, bool]] = []  # (mixing given, graph to the alphas)
    forward = SearchNetwork.forward

    def spy(self, x, mixing=None):
        if torch.is_grad_enabled():
            if mixing is not None:
                clean = self.mixing_weights()
                assert not torch.allclose(mixing[0], clean[0]) and not torch.allclose(mixing[1], clean[1])
                assert torch.allclose(mixing[0].sum(-1), torch.ones(mixing[0].shape[0]))
            seen.append((mixing is not None, self.alphas_normal.requires_grad))
        return forward(self, x, mixing)

    monkeypatch.setattr(SearchNetwork, "forward", spy)
    run(tiny(tiny_images, tmp_path / "rs", epochs=1, max_steps=2, alpha_noise=0.3))
    # Per step: the alpha step's forward (clean alphas, differentiated), then the weight step's (noisy).
    assert seen == [(False, True), (True, False)] * 2


def test_alpha_noise_off_reproduces_plain_darts_and_on_changes_the_search(tiny_images, tmp_path):
    plain = final_alphas(run(tiny(tiny_images, tmp_path / "plain", epochs=1)).run_dir)
    off = final_alphas(run(tiny(tiny_images, tmp_path / "off", epochs=1, alpha_noise=0.0)).run_dir)
    on = final_alphas(run(tiny(tiny_images, tmp_path / "on", epochs=1, max_steps=2, alpha_noise=0.3)).run_dir)
    for key in plain:
        assert torch.equal(plain[key], off[key]), key
    # The first alpha step comes before any noisy weight step; the second sees noise-trained weights.
    assert not torch.equal(plain["alphas_normal"], on["alphas_normal"])


@pytest.mark.parametrize("hvp", ["fd", "exact"])
def test_second_order_with_both_options_runs(tiny_images, tmp_path, hvp):
    result = run(tiny(tiny_images, tmp_path / hvp, epochs=2, max_steps=3, unrolled=True, hvp=hvp,
                      alpha_noise=0.3, beta_decay=2.0))
    alphas = final_alphas(result.run_dir)
    assert all(torch.isfinite(a).all() for a in alphas.values())


def test_resume_with_both_options_matches_an_uninterrupted_run(tiny_images, tmp_path):
    kw = {"epochs": 3, "alpha_noise": 0.3, "beta_decay": 2.0}
    full = run(tiny(tiny_images, tmp_path / "full", **kw))

    class Crash(Exception):
        pass

    def crash(epoch, record):
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        run(tiny(tiny_images, tmp_path / "cut", **kw), on_epoch_end=crash)
    resumed = run(resume=tmp_path / "cut")
    a, b = final_alphas(tmp_path / "full"), final_alphas(tmp_path / "cut")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.genotype == full.genotype


def test_bad_values_are_one_line_errors(tiny_images, tmp_path):
    for field in ("beta_decay", "alpha_noise"):
        with pytest.raises(UserError, match=f"--{field} must be >= 0"):
            tiny(tiny_images, tmp_path / "bad", **{field: -1.0}).validate()
    assert {"beta_decay", "alpha_noise"}.isdisjoint(search_cnn.RESUMABLE_OVERRIDES)


# -- diagnostics ---------------------------------------------------------------------------------

def cell(*edges):
    return tuple(edges)


def test_diagnostics_on_hand_made_genotypes():
    from dartsnas.genotype import Genotype, RecurrentGenotype
    from dartsnas.search.diagnostics import cnn_diagnostics, edges_changed, mean_entropy, rnn_diagnostics

    before = Genotype(normal=cell(("skip_connect", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("max_pool_3x3", 2)),
                      normal_concat=(2, 3),
                      reduce=cell(("avg_pool_3x3", 0), ("max_pool_3x3", 1), ("dil_conv_3x3", 0), ("skip_connect", 1)),
                      reduce_concat=(2, 3))
    after = Genotype(normal=cell(("skip_connect", 0), ("sep_conv_3x3", 0), ("sep_conv_5x5", 0), ("max_pool_3x3", 2)),
                     normal_concat=(2, 3), reduce=before.reduce, reduce_concat=(2, 3))
    uniform = torch.zeros(5, 8)
    one_hot = torch.full((5, 8), -1e4)
    one_hot[:, 3] = 0.0
    d = cnn_diagnostics(after, before, uniform, one_hot)
    assert d["skip_normal"] == 1 and d["skip_reduce"] == 1
    assert d["param_free_normal"] == 2 and d["param_free_reduce"] == 3
    assert d["entropy_normal"] == pytest.approx(math.log(8)) and d["entropy_reduce"] == pytest.approx(0.0, abs=1e-9)
    assert d["genotype_changes"] == 2  # an input changed on edge 1, an operation on edge 2
    assert cnn_diagnostics(before, before, uniform, uniform)["genotype_changes"] == 0
    # Half the edges uniform over 2 of 4 operations (log 2), half one-hot (0).
    two = torch.tensor([[0.0, 0.0, -1e4, -1e4], [5e3, 0.0, 0.0, 0.0]])
    assert mean_entropy(two) == pytest.approx(math.log(2) / 2)
    with pytest.raises(ValueError):
        edges_changed(before.normal, before.normal[:2])
    r0 = RecurrentGenotype(recurrent=cell(("tanh", 0), ("identity", 1), ("relu", 1)), concat=(1, 2, 3))
    r1 = RecurrentGenotype(recurrent=cell(("tanh", 0), ("identity", 0), ("identity", 1)), concat=(1, 2, 3))
    rd = rnn_diagnostics(r1, r0, torch.zeros(6, 5))
    assert rd == {"identity": 2, "entropy": pytest.approx(math.log(5)), "genotype_changes": 2}


def test_search_records_diagnostics_and_resume_compares_with_the_checkpoint(tiny_images, tmp_path):
    kw = {"epochs": 3}
    full = run(tiny(tiny_images, tmp_path / "full", **kw))
    keys = {"skip_normal", "skip_reduce", "param_free_normal", "param_free_reduce", "entropy_normal",
            "entropy_reduce", "genotype_changes"}
    for m in full.metrics:
        assert keys <= set(m)
        assert 0 <= m["skip_normal"] <= m["param_free_normal"] <= 4 and 0 < m["entropy_normal"] <= math.log(8) + 1e-9
    genotypes = [m["genotype"] for m in full.metrics]
    for prev, m in zip(genotypes, full.metrics[1:]):
        changed = sum(a != b for key in ("normal", "reduce") for a, b in zip(prev[key], m["genotype"][key]))
        assert m["genotype_changes"] == changed

    class Crash(Exception):
        pass

    def crash(epoch, record):
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        run(tiny(tiny_images, tmp_path / "cut", **kw), on_epoch_end=crash)
    resumed = run(resume=tmp_path / "cut")
    drop = {"time"}
    assert [{k: v for k, v in m.items() if k not in drop} for m in resumed.metrics] == \
        [{k: v for k, v in m.items() if k not in drop} for m in full.metrics]


def test_recurrent_search_records_diagnostics(tiny_corpus, tmp_path):
    from dartsnas.engine import search_rnn
    from dartsnas.engine.search_rnn import RNNSearchConfig

    cfg = RNNSearchConfig(data=str(tiny_corpus), save=str(tmp_path / "rnn"), batch_size=8, bptt=10, eval_batches=1,
                          epochs=2, emsize=8, nhid=8, nhidlast=8, plots=False)
    metrics = search_rnn.run(cfg).metrics
    first = metrics[0]
    assert {"identity", "entropy", "genotype_changes"} <= set(first)
    assert 0 < first["entropy"] <= math.log(5) + 1e-9
    changed = sum(a != b for a, b in zip(metrics[0]["genotype"]["recurrent"], metrics[1]["genotype"]["recurrent"]))
    assert metrics[1]["genotype_changes"] == changed


# -- DrNAS ---------------------------------------------------------------------------------------

def test_dirichlet_weights_known_answers():
    from dartsnas.search.dirichlet import concentration, kl_to_uniform, mean_weights, sample_weights

    alpha = torch.tensor([[0.0, -1.0, 2.0]], dtype=torch.float64)
    beta = torch.tensor([[1.0, math.exp(-1.0), 3.0]], dtype=torch.float64)  # elu(alpha) + 1
    torch.testing.assert_close(concentration(alpha), beta)
    torch.testing.assert_close(mean_weights(alpha), beta / beta.sum())
    # At alpha = 0 the concentration is the uniform anchor: no divergence.
    assert kl_to_uniform([torch.zeros(4, 8, dtype=torch.float64)]).item() == pytest.approx(0.0, abs=1e-12)
    a = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w1, = sample_weights([a], seed=7)
    w2, = sample_weights([a], seed=7)
    assert torch.equal(w1, w2) and (w1 > 0).all()  # a seed gives the same sample again
    torch.testing.assert_close(w1.sum(-1), torch.ones(5, dtype=torch.float64))
    state = torch.get_rng_state()
    sample_weights([a], seed=8)
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone
    # Pathwise derivative: the sample depends on alpha differentiably.
    g, = torch.autograd.grad((w1 * torch.arange(8.0, dtype=torch.float64)).sum(), a)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # The KL anchor: autograd against finite differences in float64.
    assert torch.autograd.gradcheck(lambda x: kl_to_uniform([x]), (torch.randn(3, 4, dtype=torch.float64,
                                                                               requires_grad=True),))


def test_dirichlet_network_samples_in_training_and_uses_the_mean_otherwise():
    from dartsnas.search.dirichlet import mean_weights

    torch.manual_seed(0)
    model = SearchNetwork(C=2, num_classes=3, layers=3, steps=2, multiplier=2, dirichlet=True).double()
    with torch.no_grad():
        model.alphas_normal.normal_()
    model.eval()
    wn, _ = model.mixing_weights()
    torch.testing.assert_close(wn, mean_weights(model.alphas_normal))
    assert model.arch_weights()["normal"] == mean_weights(model.alphas_normal.float()).tolist()
    model.train()
    model.dirichlet_seed = 3
    a, b = model.mixing_weights(), model.mixing_weights()
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[0], wn)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(model(x), model(x))  # one seed: the same sample in every loss of an alpha step
    plain = SearchNetwork(C=2, num_classes=3, layers=3, steps=2, multiplier=2).double()
    assert torch.equal(plain.mixing_weights()[0], F.softmax(plain.alphas_normal, dim=-1))


def test_dirichlet_losses_of_one_step_share_the_sample():
    # Every loss of the alpha step sees the same theta, so the finite-difference Hessian-vector product
    # (DARTS eq. 8) differentiates L_train(w, theta(alpha)) and agrees with the exact one.
    arch, batch, _ = tiny_architect(True, "fd", dirichlet=True)
    gen = torch.Generator().manual_seed(2)
    v = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in arch.weights]
    # A small step keeps both sides of the difference between the same ReLU and max-pool kinks.
    fd, exact = arch.hvp_fd(v, batch, r=1e-6), arch.hvp_exact(v, batch)
    for a, b in zip(fd, exact):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_dirichlet_eigenvalue_sees_one_sample_drawn_from_its_seed():
    # The Hessian of a DrNAS network's loss depends on its sample; the diagnostic fixes the sample by
    # its seed (so epochs compare), draws nothing from the global generator and restores the network.
    arch, _, batch_v, model = tiny_search(False, "fd", dirichlet=True)
    model.dirichlet_seed = None  # as between the search's steps
    state = torch.get_rng_state()
    first = search_eigenvalue(arch, model, batch_v, seed=5, iterations=5)
    assert torch.equal(torch.get_rng_state(), state) and model.dirichlet_seed is None
    torch.manual_seed(123)  # another global state: the same value
    assert search_eigenvalue(arch, model, batch_v, seed=5, iterations=5) == first
    assert search_eigenvalue(arch, model, batch_v, seed=6, iterations=5) != first


@pytest.mark.parametrize("unrolled,hvp", [(False, "fd"), (True, "fd"), (True, "exact")])
def test_dirichlet_search_runs_first_and_second_order(tiny_images, tmp_path, unrolled, hvp):
    result = run(tiny(tiny_images, tmp_path / "dr", epochs=1, max_steps=2, unrolled=unrolled, hvp=hvp,
                      dirichlet=True, dirichlet_kl=0.01, hvp_check=unrolled))
    alphas = final_alphas(result.run_dir)
    assert all(torch.isfinite(a).all() for a in alphas.values())
    assert ("hvp_cosine" in result.metrics[0]) == unrolled
    assert "dirichlet: true" in (result.run_dir / "config.yaml").read_text()


def test_dirichlet_resume_matches_an_uninterrupted_run(tiny_images, tmp_path):
    kw = {"epochs": 3, "dirichlet": True, "dirichlet_kl": 0.01}
    full = run(tiny(tiny_images, tmp_path / "full", **kw))

    class Crash(Exception):
        pass

    def crash(epoch, record):
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        run(tiny(tiny_images, tmp_path / "cut", **kw), on_epoch_end=crash)
    resumed = run(resume=tmp_path / "cut")
    a, b = final_alphas(tmp_path / "full"), final_alphas(tmp_path / "cut")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.genotype == full.genotype


def test_dirichlet_option_errors(tiny_images, tmp_path):
    with pytest.raises(UserError, match="--dirichlet_kl needs --dirichlet"):
        tiny(tiny_images, tmp_path / "x", dirichlet_kl=0.1).validate()
    with pytest.raises(UserError, match="use one of them"):
        tiny(tiny_images, tmp_path / "x", dirichlet=True, alpha_noise=0.3).validate()


def test_adversarial_weights_raise_the_loss_within_the_ball():
    """SDARTS-ADV's attack on a loss with a known worst case: L(A) = sum(A * c) is largest on each row at
    the simplex point that moves weight towards the largest c, within eps of softmax(alpha)."""
    from dartsnas.search.alpha_noise import adversarial_weights, project_rows

    torch.manual_seed(0)
    alphas = [torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)]
    costs = [torch.randn(5, 8, dtype=torch.float64) for _ in alphas]

    def loss_of(mixing):
        return sum((m * c).sum() for m, c in zip(mixing, costs))

    eps = 0.1
    clean = [F.softmax(a, -1) for a in alphas]
    gen = torch.Generator().manual_seed(1)
    attacked = adversarial_weights(loss_of, alphas, eps, 7, gen)
    again = adversarial_weights(loss_of, alphas, eps, 7, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(attacked, again))  # seeded: a resume attacks alike
    for a, c in zip(attacked, clean):
        assert torch.allclose(a.sum(-1), torch.ones(5, dtype=torch.float64)) and (a >= 0).all()
        # Within the ball before the projection rescales: every entry moved by at most about eps.
        assert (a - c).abs().max() < 3 * eps
    assert loss_of(attacked) > loss_of(clean)
    # And above a random perturbation of the same size, on average.
    noise = [project_rows(c + (2 * torch.rand(c.shape, dtype=torch.float64) - 1) * eps) for c in clean]
    assert loss_of(attacked) > loss_of(noise)


def test_alpha_adversarial_off_is_plain_darts_and_on_runs_first_and_second_order(tiny_images, tmp_path):
    plain = final_alphas(run(tiny(tiny_images, tmp_path / "plain", epochs=1)).run_dir)
    off = final_alphas(run(tiny(tiny_images, tmp_path / "off", epochs=1, alpha_adversarial=0.0)).run_dir)
    assert all(torch.equal(plain[k], off[k]) for k in plain)
    on = final_alphas(run(tiny(tiny_images, tmp_path / "on", epochs=1, max_steps=2, alpha_adversarial=0.3,
                               adversarial_steps=2)).run_dir)
    assert not torch.equal(plain["alphas_normal"], on["alphas_normal"])
    second = run(tiny(tiny_images, tmp_path / "u", epochs=1, max_steps=2, unrolled=True, hvp="exact",
                      alpha_adversarial=0.3, adversarial_steps=2))
    assert all(torch.isfinite(a).all() for a in final_alphas(second.run_dir).values())


def test_alpha_adversarial_resume_and_errors(tiny_images, tmp_path):
    kw = {"epochs": 2, "alpha_adversarial": 0.3, "adversarial_steps": 2}
    full = run(tiny(tiny_images, tmp_path / "full", **kw))

    class Crash(Exception):
        pass

    def crash(epoch, record):
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        run(tiny(tiny_images, tmp_path / "cut", **kw), on_epoch_end=crash)
    resumed = run(resume=tmp_path / "cut")
    a, b = final_alphas(tmp_path / "full"), final_alphas(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed.genotype == full.genotype
    with pytest.raises(UserError, match="cannot be combined"):
        tiny(tiny_images, tmp_path / "x", alpha_adversarial=0.3, alpha_noise=0.3).validate()
    with pytest.raises(UserError, match="--adversarial_steps must be at least 1"):
        tiny(tiny_images, tmp_path / "x", alpha_adversarial=0.3, adversarial_steps=0).validate()
