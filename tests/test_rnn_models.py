"""The trained recurrent model: names, size, regularisers, perplexity, gradient accumulation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dartsnas.data.text import batchify
from dartsnas.engine.evaluate_rnn import evaluate, rnn_info
from dartsnas.engine.train_rnn import tar_loss, weight_step
from dartsnas.genotype import get_genotype
from dartsnas.models.rnn import RNNModel, RNNOutput, count_parameters

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "state_dict_keys_ptb.txt"
DARTS = get_genotype("DARTS", kind="rnn")


def test_darts_v2_at_850_units_has_the_papers_parameter_count():
    assert rnn_info("DARTS_V2", ntoken=10000, emsize=850) == 22_960_000
    assert rnn_info("DARTS", ntoken=10000, emsize=850) == 22_960_000


def test_parameter_names_and_shapes_match_the_released_model():
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not found")
    expected = {}
    for line in REFERENCE.read_text().splitlines():
        name, shape = line.split()
        expected[name] = tuple(int(s) for s in shape.split("x"))
    with torch.device("meta"):
        model = RNNModel(10000, 850, 850, 850, genotype=DARTS)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert model.decoder.weight is model.encoder.weight  # tied, counted once
    assert count_parameters(model) == 22_960_000


class Unigram(torch.nn.Module):
    """A hand-made language model: the same next-word distribution everywhere."""

    def __init__(self, logp: torch.Tensor):
        super().__init__()
        self.logp = logp
        self.calls: list[int] = []

    def init_hidden(self, bsz: int) -> torch.Tensor:
        return torch.zeros(bsz, 1)

    def forward(self, data: torch.Tensor, hidden: torch.Tensor) -> RNNOutput:
        self.calls.append(data.shape[0])
        return RNNOutput(self.logp.expand(*data.shape, -1), hidden + 1, torch.zeros(*data.shape, 1))


def test_perplexity_is_exp_of_the_mean_token_loss_over_the_whole_split():
    torch.manual_seed(0)
    logp = torch.randn(7, dtype=torch.float64).log_softmax(0)
    source = batchify(torch.randint(0, 7, (203,)), 4)  # 50 rows: chunks of 35 and 14 (uneven on purpose)
    model = Unigram(logp)
    loss = evaluate(model, source, bptt=35)
    targets = source[1:].reshape(-1)
    expected = float(-logp[targets].mean())
    assert model.calls == [35, 14]
    assert math.isclose(loss, expected, rel_tol=1e-12)
    assert math.isclose(math.exp(loss), math.exp(expected), rel_tol=1e-12)


def test_eval_mode_is_deterministic_and_train_mode_drops_out():
    model = RNNModel(13, 6, 6, genotype=DARTS)
    x, h = torch.randint(0, 13, (5, 3)), model.init_hidden(3)
    model.eval()
    assert torch.equal(model(x, h).logits, model(x, h).logits)
    model.train()
    assert not torch.equal(model(x, h).logits, model(x, h).logits)


def test_every_weight_of_the_final_model_gets_a_gradient():
    model = RNNModel(13, 6, 6, genotype=get_genotype("ENAS"))
    x = torch.randint(0, 13, (6, 3))
    out = model(x[:-1], model.init_hidden(3))
    (F.cross_entropy(out.logits.reshape(-1, 13), x[1:].reshape(-1)) + tar_loss(out.raw_output)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"


def test_small_batch_accumulation_gives_the_same_update():
    torch.manual_seed(0)
    ref = RNNModel(13, 6, 6, genotype=DARTS, dropout=0, dropouth=0, dropoutx=0, dropouti=0, dropoute=0).double()
    tokens = torch.randint(0, 13, (8, 4))
    h = torch.randn(4, 6, dtype=torch.float64)
    results = []
    for chunks in (1, 2):
        model = RNNModel(13, 6, 6, genotype=DARTS, dropout=0, dropouth=0, dropoutx=0, dropouti=0, dropoute=0).double()
        model.load_state_dict(ref.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        hiddens = list(h.chunk(chunks))
        loss = weight_step(model, opt, list(model.parameters()), tokens[:-1], tokens[1:], hiddens, 0.5, 0.25, 1e-3)
        results.append((loss, torch.cat(hiddens), model.state_dict()))
        assert opt.param_groups[0]["lr"] == 1.0  # the per-step lr is temporary
    (l1, h1, s1), (l2, h2, s2) = results
    assert math.isclose(l1, l2, rel_tol=1e-12)
    torch.testing.assert_close(h1, h2)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-10, atol=1e-12)
    assert not torch.equal(s1["rnns.0._W0"], ref.state_dict()["rnns.0._W0"])
