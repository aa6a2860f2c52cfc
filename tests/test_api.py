"""The Python API's front: ``dartsnas.create_model`` and ``dartsnas.load_model``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dartsnas
from dartsnas.errors import UserError
from dartsnas.models.cnn import NetworkCIFAR
from dartsnas.models.rnn import RNNModel


def test_create_model_gives_plain_logits_and_paper_sizes():
    model = dartsnas.create_model("DARTS_V2", "cifar10", init_channels=4, layers=3, auxiliary=True).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    logits = model(x)
    assert logits.shape == (2, 10)
    assert torch.nn.CrossEntropyLoss()(model(x), y).item() > 0
    model.train()
    logits, aux = model(x, aux=True)
    assert aux is not None and aux.shape == (2, 10)
    big = dartsnas.create_model("DARTS", "cifar10")
    assert len(big.cells) == 20
    rnn = dartsnas.create_model("DARTS", "ptb", units=8, vocab=30)
    assert isinstance(rnn, RNNModel) and rnn.ntoken == 30
    with pytest.raises(UserError, match="unknown dataset"):
        dartsnas.create_model("DARTS", "mnist")
    with pytest.raises(UserError, match="recurrent"):
        dartsnas.create_model("ENAS", "cifar10")


def test_load_model_reads_plain_and_dartsnas_weights(tmp_path: Path, tiny_corpus: Path):
    net = NetworkCIFAR(4, 10, 3, False, dartsnas.get_genotype("DARTS_V1")).eval()
    torch.save(net.state_dict(), tmp_path / "cifar10_model.pt")  # as the authors' released file
    loaded = dartsnas.load_model(tmp_path / "cifar10_model.pt", arch="DARTS_V1")
    x = torch.randn(2, 3, 32, 32)
    assert not loaded.training and torch.equal(loaded(x), net(x))

    from dartsnas.engine import train_rnn
    from dartsnas.engine.train_rnn import TrainConfig

    run = tmp_path / "train"
    train_rnn.run(TrainConfig(data=str(tiny_corpus), save=str(run), emsize=8, nhid=8, nhidlast=8, batch_size=4,
                              bptt=5, epochs=1, max_steps=2, eval_batches=1, final_test=False, plots=False,
                              threads=1))
    for source in (run, run / "best.safetensors"):
        lm = dartsnas.load_model(source)
        assert isinstance(lm, RNNModel) and not lm.training and lm.nhid == 8


def test_importing_dartsnas_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, dartsnas; assert 'torch' not in sys.modules; dartsnas.create_model; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout.strip() == "ok", out.stderr
