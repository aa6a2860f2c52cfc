"""``--log_steps`` (RUN_DIR/steps.jsonl), ``--limit_train_batches`` and the run-level progress line, in the
epoch loop every job shares."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from dartsnas.engine import loop, search_cnn, search_rnn, train_cnn, train_rnn
from dartsnas.errors import UserError
from dartsnas.settings.search_cnn import SearchConfig

TINY_RNN = {"emsize": 8, "nhid": 8, "nhidlast": 8, "batch_size": 4, "bptt": 5, "eval_batches": 1, "plots": False,
            "threads": 1}


@pytest.fixture
def images(cifar_head) -> Path:
    """The first 64 real CIFAR-10 training images: four steps of batch 8 per search stream."""
    return cifar_head(64)


def cnn_search(data: Path, save: Path, **kw) -> SearchConfig:
    args = {"data": str(data), "save": str(save), "init_channels": 2, "layers": 3, "batch_size": 8, "epochs": 2,
            "eval_batches": 1, "plots": False, "seed": 5, "threads": 1, "primitives": "none,skip_connect,sep_conv_3x3",
            "log_steps": True}
    return SearchConfig(**{**args, **kw})


def step_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def test_one_line_per_step_with_loss_and_learning_rate(images: Path, tmp_path: Path):
    result = search_cnn.run(cnn_search(images, tmp_path / "run", report_freq=1))
    lines = step_lines(result.run_dir)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6, 7, 8]  # two epochs of four steps
    assert [line["epoch"] for line in lines] == [1] * 4 + [2] * 4
    assert all(set(line) == {"step", "epoch", "loss", "lr"} and line["loss"] > 0 for line in lines)
    assert [line["lr"] for line in lines[::4]] == [m["lr"] for m in result.metrics]
    # The running mean the epoch reports is the mean of its steps' losses (equal batches).
    assert result.metrics[0]["train_loss"] == pytest.approx(np.mean([line["loss"] for line in lines[:4]]), rel=1e-6)
    log = (result.run_dir / "log.txt").read_text()
    assert "epoch 1 step 1/4 (run step 1/8, about" in log and "epoch 2 step 4/4 (run step 8/8) loss" in log


def test_no_step_log_unless_asked(images: Path, tmp_path: Path):
    result = search_cnn.run(cnn_search(images, tmp_path / "run", log_steps=False, epochs=1, max_steps=1))
    assert not (result.run_dir / "steps.jsonl").exists()


def test_a_kill_mid_epoch_then_resume_neither_loses_nor_repeats_a_step(images: Path, tmp_path: Path, monkeypatch):
    straight = step_lines(search_cnn.run(cnn_search(images, tmp_path / "straight")).run_dir)

    class Killed(Exception):
        pass

    write = loop.StepLog.write

    def write_then_die(self, step, *args):
        write(self, step, *args)
        if step == 6:  # two steps into epoch 2, whose checkpoint does not exist yet
            raise Killed

    monkeypatch.setattr(loop.StepLog, "write", write_then_die)
    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        search_cnn.run(cnn_search(images, cut))
    monkeypatch.setattr(loop.StepLog, "write", write)
    with (cut / "steps.jsonl").open("a") as f:
        f.write('{"step": 7, "ep')  # a line cut short by the kill
    assert len((cut / "steps.jsonl").read_text().splitlines()) == 7
    search_cnn.run(resume=cut)
    assert step_lines(cut) == straight  # the same steps, once each, with the same losses
    # Resuming the finished run writes no step again.
    search_cnn.run(resume=cut)
    assert step_lines(cut) == straight


def test_limit_train_batches_caps_every_epoch_of_every_job(images: Path, tiny_corpus: Path, tmp_path: Path):
    runs = {
        "search cnn": search_cnn.run(cnn_search(images, tmp_path / "sc", limit_train_batches=3)),
        "search rnn": search_rnn.run(search_rnn.RNNSearchConfig(
            data=str(tiny_corpus), save=str(tmp_path / "sr"), epochs=2, limit_train_batches=3, log_steps=True,
            **TINY_RNN)),
        "train cifar10": train_cnn.run(train_cnn.CifarTrainConfig(
            data=str(images), test_data=str(images), save=str(tmp_path / "tc"), layers=3, init_channels=4,
            batch_size=8, epochs=2, limit_train_batches=3, log_steps=True, auxiliary=False, plots=False, threads=1)),
        "train ptb": train_rnn.run(train_rnn.TrainConfig(
            data=str(tiny_corpus), save=str(tmp_path / "tr"), epochs=2, limit_train_batches=3, log_steps=True,
            final_test=False, **TINY_RNN)),
    }
    for name, result in runs.items():
        assert [m["step"] for m in result.metrics] == [3, 6], name
        assert [line["step"] for line in step_lines(result.run_dir)] == [1, 2, 3, 4, 5, 6], name
        config = yaml.safe_load((result.run_dir / "config.yaml").read_text())["config"]
        assert config["limit_train_batches"] == 3 and config["log_steps"] is True, name


def test_limit_train_batches_with_max_steps_and_resume(images: Path, tmp_path: Path):
    save = tmp_path / "run"
    result = search_cnn.run(cnn_search(images, save, epochs=3, limit_train_batches=3, max_steps=4))
    assert [m["step"] for m in result.metrics] == [3, 4]
    # A resume may lift the limits: the run goes on from its last epoch with all four steps per epoch.
    resumed = search_cnn.run(search_cnn.resume_config(save, {"max_steps": None, "limit_train_batches": None}),
                             resume=save)
    assert [m["step"] for m in resumed.metrics] == [3, 4, 8]
    assert [line["step"] for line in step_lines(save)] == list(range(1, 9))


def test_bad_limit_is_one_line():
    with pytest.raises(UserError, match="--limit_train_batches must be at least 1, got 0"):
        SearchConfig(limit_train_batches=0).validate()


def test_steps_go_to_tensorboard_too(images: Path, tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = search_cnn.run(cnn_search(images, tmp_path / "run", epochs=1, tensorboard=True))
    events = EventAccumulator(str(result.run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("step/loss")] == [1, 2, 3, 4]
    assert len(events.Scalars("step/lr")) == 4


def test_a_resumed_run_shows_every_step_once_in_tensorboard(images: Path, tmp_path: Path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
        events = EventAccumulator(str(run_dir / "tb"))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars(tag)]

    straight = search_cnn.run(cnn_search(images, tmp_path / "straight", tensorboard=True)).run_dir

    class Killed(Exception):
        pass

    write = loop.StepLog.write

    def write_then_die(self, step, *args):
        write(self, step, *args)
        if step == 6:  # two steps into epoch 2: steps 5 and 6 reached TensorBoard, not the checkpoint
            raise Killed

    monkeypatch.setattr(loop.StepLog, "write", write_then_die)
    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        search_cnn.run(cnn_search(images, cut, tensorboard=True))
    monkeypatch.setattr(loop.StepLog, "write", write)
    assert [s for s, _ in scalars(cut, "step/loss")] == [1, 2, 3, 4, 5, 6]
    search_cnn.run(resume=cut)
    for tag in ("step/loss", "step/lr", "train_loss", "valid_acc"):
        assert scalars(cut, tag) == scalars(straight, tag), tag  # once each, with the same values
