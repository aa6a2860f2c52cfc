"""The one epoch loop (``engine/loop.py``): what every job gets from it, checked on the real jobs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dartsnas.checkpoint import load_weights
from dartsnas.cli import main
from dartsnas.engine import loop, search_cnn, train_rnn
from dartsnas.engine.search_cnn import SearchConfig
from dartsnas.engine.train_rnn import TrainConfig
from dartsnas.errors import UserError

TINY_RNN = {"emsize": 8, "nhid": 8, "nhidlast": 8, "plots": False, "threads": 1, "batch_size": 4, "bptt": 5}


@pytest.fixture
def small_npz(cifar_train_npz: Path, tmp_path: Path) -> Path:
    with np.load(cifar_train_npz) as f:
        x, y = f["x"][:48], f["y"][:48]
    path = tmp_path / "small.npz"
    np.savez(path, x=x, y=y)
    return path


def tiny_search(data: Path, save: Path, **kw) -> SearchConfig:
    args = {"data": str(data), "save": str(save), "init_channels": 2, "layers": 3, "batch_size": 12, "epochs": 2,
            "plots": False, "seed": 5}
    args.update(kw)
    return SearchConfig(**args)


def test_a_failed_start_leaves_no_run_directory(tmp_path: Path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 16, 16, 3), np.uint8), y=np.zeros(4, np.int64))
    save = tmp_path / "run"
    # 16x16 images are not CIFAR-10's: the run fails while reading its data, before any step.
    rc = main(["search", "cnn", "--data", str(bad), "--save", str(save), "--no-plots"])
    assert rc == 2 and "--dataset npz" in capsys.readouterr().err
    assert not save.exists()


def test_a_failed_start_keeps_a_folder_the_user_made(tmp_path: Path, capsys):
    save = tmp_path / "mine"
    save.mkdir()
    (save / "notes.txt").write_text("keep me")
    rc = main(["search", "cnn", "--data", str(tmp_path / "missing.npz"), "--save", str(save), "--no-plots"])
    assert rc == 2
    assert (save / "notes.txt").read_text() == "keep me"


def test_tensorboard_without_the_package_fails_before_the_run_directory(tmp_path: Path, monkeypatch):
    def refuse() -> None:
        raise UserError('--tensorboard needs the tensorboard package: pip install "dartsnas[tensorboard]"')

    monkeypatch.setattr(loop, "_require_tensorboard", refuse)
    with pytest.raises(UserError, match="tensorboard"):
        search_cnn.run(SearchConfig(dataset="digits", save=str(tmp_path / "r"), tensorboard=True))
    assert not (tmp_path / "r").exists()


def test_epoch_context_counts_steps_and_stops_on_a_non_finite_loss():
    class Bar:
        n = 0

        def update(self, k: int) -> None:
            self.n += k

        def set_postfix(self, *args, **kwargs) -> None:
            pass

    bar = Bar()
    ctx = loop.EpochContext(epoch=0, step=10, limit=2, total=2, report_freq=1, nan_hint="lower --lr", bar=bar)
    assert ctx.can_step()
    assert ctx.advance(1.5, acc=50.0) is True
    assert ctx.advance(1.4) is True
    assert not ctx.can_step() and ctx.step == 12 and bar.n == 2
    with pytest.raises(UserError, match=r"became nan at step 13; lower --lr"):
        ctx.advance(math.nan)


def test_progress_total_follows_max_steps(small_npz: Path, tmp_path: Path, monkeypatch):
    totals = []
    real = loop._bar

    def spy(total: int, desc: str):
        totals.append((total, desc))
        return real(total, desc)

    monkeypatch.setattr(loop, "_bar", spy)
    search_cnn.run(tiny_search(small_npz, tmp_path / "r", epochs=3, max_steps=3))
    # Two steps per epoch (24 images, batch 12): 2, then the 1 step left under --max_steps.
    assert totals == [(2, "epoch 1/3"), (1, "epoch 2/3")]


def test_log_starts_with_a_settings_block_and_ends_with_the_genotype_once(small_npz: Path, tmp_path: Path):
    search_cnn.run(tiny_search(small_npz, tmp_path / "r"))
    log = (tmp_path / "r" / "log.txt").read_text()
    assert "settings:\n" in log and "init_channels=2" in log
    assert log.count("final genotype = ") == 1
    # Epoch 1's genotype is logged; the last epoch's is the final one, logged once.
    assert log.count("] genotype = ") == 0 and log.count(" genotype = Genotype(") == 2
    assert "left)" in log  # the run's remaining time after an epoch that is not the last


def test_resuming_a_finished_search_writes_a_missing_result(small_npz: Path, tmp_path: Path):
    run_dir = tmp_path / "r"
    first = search_cnn.run(tiny_search(small_npz, run_dir, epochs=1, max_steps=1))
    # A kill between the final checkpoint and the result file loses the result; a resume restores it.
    (run_dir / "genotype.json").unlink()
    again = search_cnn.run(resume=run_dir)
    assert again.genotype == first.genotype
    assert json.loads((run_dir / "genotype.json").read_text()) == first.genotype.to_dict()


def test_recurrent_training_writes_safetensors_and_tests_them(tiny_corpus: Path, tmp_path: Path, capsys):
    save = tmp_path / "train"
    result = train_rnn.run(TrainConfig(data=str(tiny_corpus), save=str(save), epochs=2, max_steps=6,
                                       eval_batches=2, test_batch_size=2, **TINY_RNN))
    assert not (save / "checkpoints" / "best.pt").exists()
    best = load_weights(save / "best.safetensors")
    final = load_weights(save / "final.safetensors")
    assert best.model == final.model == "ptb" and best.genotype == result.genotype
    assert best.config["emsize"] == 8 and json.loads(best.meta["model_args"])["ntoken"] > 0
    # The tied decoder is stored once and comes back as the embedding.
    assert torch.equal(best.state_dict["decoder.weight"], best.state_dict["encoder.weight"])
    # The final test obeys --eval_batches and says how much of the test set it read.
    test = json.loads((save / "test.json").read_text())
    assert test["test_chunks"] == 2 < test["test_chunks_total"]
    assert test["test_loss"] == result.test_loss
    capsys.readouterr()
    assert main(["test", "ptb", "--model-path", str(save), "--data", str(tiny_corpus), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "test ppl" in out.lower() or "test perplexity" in out.lower()


def test_resuming_finished_training_reports_its_test_without_recomputing(tiny_corpus: Path, tmp_path: Path):
    save = tmp_path / "train"
    first = train_rnn.run(TrainConfig(data=str(tiny_corpus), save=str(save), epochs=1, max_steps=3, eval_batches=1,
                                      test_batch_size=2, **TINY_RNN))
    again = train_rnn.run(resume=save)
    assert again.test_loss == first.test_loss and len(again.metrics) == 1
