"""``search rnn``, ``train ptb|wt2`` and ``test ptb`` end to end: real data, run directories, resume, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from dartsnas.cli import build_parser, main
from dartsnas.data.text import Corpus
from dartsnas.engine import search_rnn, train_rnn
from dartsnas.engine.search_rnn import RNNSearchConfig
from dartsnas.engine.train_rnn import TrainConfig, config_from_args

TINY_MODEL = {"emsize": 8, "nhid": 8, "nhidlast": 8, "plots": False, "threads": 1}


@pytest.fixture
def ptb_slice(ptb_dir: Path, tmp_path: Path) -> Path:
    """The first 2,000 / 200 / 200 lines of Penn Treebank (about 47k training tokens)."""
    out = tmp_path / "ptb_slice"
    out.mkdir()
    for split, n in (("train", 2000), ("valid", 200), ("test", 200)):
        lines = (ptb_dir / f"{split}.txt").read_text().splitlines(keepends=True)[:n]
        (out / f"{split}.txt").write_text("".join(lines))
    return out


# Slow: a real PTB slice (about 16 s); the tiny-corpus tests below cover search, train and test by default.
@pytest.mark.slow
def test_short_real_run_lowers_validation_perplexity_far_below_the_vocabulary(ptb_slice: Path, tmp_path: Path):
    vocab = len(Corpus(ptb_slice))
    cfg = TrainConfig(data=str(ptb_slice), save=str(tmp_path / "run"), emsize=64, nhid=64, nhidlast=64, batch_size=16,
                      bptt=20, dropout=0.1, dropouth=0.05, dropoutx=0.1, dropouti=0.05, dropoute=0.0, epochs=2,
                      max_steps=250, final_test=False, plots=False, threads=1)
    result = train_rnn.run(cfg)
    ppl = [m["valid_ppl"] for m in result.metrics]
    assert len(ppl) == 2 and ppl[1] < ppl[0]
    # An untrained model sits near the vocabulary size (~5,500 here); a few hundred steps reach far below.
    assert ppl[-1] < vocab / 6, (ppl, vocab)


def test_search_cli_writes_every_run_dir_file(tiny_corpus: Path, tmp_path: Path, capsys):
    save = tmp_path / "search"
    rc = main(["search", "rnn", "--data", str(tiny_corpus), "--emsize", "8", "--nhid", "8", "--nhidlast", "8",
               "--batch-size", "4", "--bptt", "5", "--unrolled", "--max_steps", "3", "--eval_batches", "2",
               "--hvp_check", "--threads", "1", "--save", str(save), "--no-plots"])
    assert rc == 0
    assert "genotype = Genotype(recurrent=[" in capsys.readouterr().out
    cfg = yaml.safe_load((save / "config.yaml").read_text())
    assert cfg["command"] == "search-rnn" and cfg["config"]["unrolled"] is True
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["step"] == 3
    assert {"train_loss", "valid_loss", "valid_ppl", "genotype", "hvp_cosine", "implicit_ratio"} <= set(metrics[0])
    genotype = json.loads((save / "genotype.json").read_text())
    assert len(genotype["recurrent"]) == 8 and genotype["concat"] == list(range(1, 9))
    assert json.loads((save / "genotypes" / "epoch_001.json").read_text()) == genotype
    alphas = json.loads((save / "alphas" / "epoch_001.json").read_text())
    assert alphas["primitives"] == ["none", "tanh", "relu", "sigmoid", "identity"]
    assert len(alphas["recurrent"]) == 36 and all(abs(sum(r) - 1) < 1e-5 for r in alphas["recurrent"])
    state = torch.load(save / "checkpoints" / "last.pt", weights_only=True)
    assert state["finished"] and state["model"]["alphas"].shape == (36, 5)


class Interrupted(Exception):
    pass


def interrupt_after(epoch: int):
    def hook(done: int, record: dict) -> None:
        if done == epoch:
            raise Interrupted
    return hook


def test_search_resume_reproduces_an_uninterrupted_search(tiny_corpus: Path, tmp_path: Path):
    def cfg(save, **kw):
        return RNNSearchConfig(data=str(tiny_corpus), save=str(save), batch_size=8, bptt=10, eval_batches=1,
                               epochs=2, **TINY_MODEL, **kw)

    straight = search_rnn.run(cfg(tmp_path / "a"))
    with pytest.raises(Interrupted):
        search_rnn.run(cfg(tmp_path / "b"), on_epoch_end=interrupt_after(1))
    resumed = search_rnn.run(resume=tmp_path / "b")
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["valid_loss"] for m in straight.metrics] == [m["valid_loss"] for m in resumed.metrics]


def test_train_resume_keeps_the_averaged_sgd_state(tiny_corpus: Path, tmp_path: Path):
    # A large learning rate on random text soon makes validation worse, so NT-ASGD switches (nonmono 1).
    def cfg(save, **kw):
        return TrainConfig(data=str(tiny_corpus), save=str(save), batch_size=8, bptt=10, epochs=5, nonmono=1,
                           learning_rate=60.0, final_test=True, **TINY_MODEL, **kw)

    straight = train_rnn.run(cfg(tmp_path / "a"))
    kinds = [m["optimizer"] for m in straight.metrics]
    assert kinds[0] == "sgd" and kinds[-1] == "asgd", kinds
    switch = kinds.index("asgd") + 1
    with pytest.raises(Interrupted):
        train_rnn.run(cfg(tmp_path / "b"), on_epoch_end=interrupt_after(switch))
    state = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert state["optimizer_kind"] == "asgd" and "t0" in state["optimizer"]["param_groups"][0]
    resumed = train_rnn.run(resume=tmp_path / "b")
    assert [m["valid_loss"] for m in straight.metrics] == [m["valid_loss"] for m in resumed.metrics]
    assert straight.test_loss == resumed.test_loss
    test = json.loads((tmp_path / "a" / "test.json").read_text())
    assert math.isclose(test["test_ppl"], math.exp(straight.test_loss))


def test_train_and_test_commands_on_our_checkpoint(tiny_corpus: Path, tmp_path: Path, capsys):
    save = tmp_path / "train"
    args = ["train", "ptb", "--data", str(tiny_corpus), "--arch", "DARTS_V1", "--emsize", "8", "--nhid", "8",
            "--nhidlast", "8", "--batch_size", "8", "--small_batch_size", "4", "--bptt", "10", "--max_steps", "2",
            "--threads", "1", "--save", str(save), "--no-plots"]
    assert main(args) == 0
    assert "test ppl" in capsys.readouterr().out
    assert {"config.yaml", "log.txt", "metrics.jsonl", "genotype.json", "test.json"} <= {p.name for p in save.iterdir()}
    assert main(["test", "ptb", "--model-path", str(save)]) == 0  # data taken from the run
    out = capsys.readouterr().out
    assert "valid ppl" in out and "test ppl" in out
    # A corpus with words the model never saw.
    other = tmp_path / "other"
    other.mkdir()
    for split in ("train", "valid", "test"):
        (other / f"{split}.txt").write_text("w1 unheard w2\n")
    assert main(["test", "ptb", "--model-path", str(save / "best.safetensors"), "--data", str(other)]) == 2
    assert "outside the model's vocabulary" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "ptb", "--batch_size", "10", "--small_batch_size", "4"], "must divide --batch_size"),
    (["train", "ptb", "--emsize", "10"], "must be equal"),
    (["search", "rnn", "--data", "/nonexistent/corpus"], "does not exist"),
    (["train", "wt2", "--data", "/nonexistent/corpus"], "does not exist"),
    (["train", "ptb", "--arch", "DARTS_V2", "--data", "/nonexistent"], "does not exist"),
    (["train", "ptb", "--arch", "NASNet"], "convolutional"),
    (["test", "ptb"], "--model-path"),
    (["test", "wt2", "--model-path", "/nonexistent/model.pt"], "does not exist"),
])
def test_bad_input_is_one_line_error(argv, message, tmp_path: Path, capsys):
    assert main([*argv, "--save", str(tmp_path / "run")] if argv[0] != "test" else argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_wt2_starts_from_its_paper_settings_and_flags_win():
    parser = build_parser()
    cfg = config_from_args(parser.parse_args(["train", "wt2"]), "wt2")
    assert (cfg.emsize, cfg.nhid, cfg.nhidlast, cfg.dropouth, cfg.weight_decay) == (700, 700, 700, 0.15, 5e-7)
    assert cfg.data_dir == "data/wikitext-2"
    cfg = config_from_args(parser.parse_args(["train", "wt2", "--wdecay", "1e-6", "--lr", "10"]), "wt2")
    assert cfg.weight_decay == 1e-6 and cfg.learning_rate == 10.0
    ptb = config_from_args(parser.parse_args(["train", "ptb", "--config", "train-ptb-paper"]), "ptb")
    assert (ptb.emsize, ptb.batch_size, ptb.weight_decay, ptb.dropoute) == (850, 64, 8e-7, 0.1)
    search = parser.parse_args(["search", "rnn", "--config", "search-rnn-paper-unrolled"])
    assert search.config == "search-rnn-paper-unrolled"
