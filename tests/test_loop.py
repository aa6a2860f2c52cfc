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


def test_a_new_run_refuses_a_folder_that_is_not_its_own(tmp_path: Path, capsys):
    save = tmp_path / "mine"
    save.mkdir()
    (save / "notes.txt").write_text("keep me")
    rc = main(["search", "cnn", "--dataset", "digits", "--save", str(save), "--no-plots"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "is not empty" in err and "--save" in err
    assert sorted(p.name for p in save.iterdir()) == ["notes.txt"]
    assert (save / "notes.txt").read_text() == "keep me"


def test_a_run_directory_is_locked_for_the_life_of_a_run(small_npz: Path, tmp_path: Path, capsys):
    import os

    from dartsnas.rundir import RunDir

    holder = RunDir(tmp_path / "r")
    holder.path.mkdir()
    holder.lock()
    try:
        rc = main(["search", "cnn", "--data", str(small_npz), "--save", str(holder.path), "--no-plots"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and f"PID {os.getpid()}" in err
    finally:
        holder.unlock()
    assert not holder.lock_file.exists()
    search_cnn.run(tiny_search(small_npz, holder.path, epochs=1, max_steps=1))
    assert not holder.lock_file.exists()  # released at the end of the run


def test_a_run_stopped_in_its_first_epoch_restarts_in_place(small_npz: Path, tmp_path: Path):
    run_dir = tmp_path / "r"
    full = search_cnn.run(tiny_search(small_npz, tmp_path / "full", epochs=1))

    class Kill(Exception):
        pass

    def kill(epoch, record):
        raise Kill

    with pytest.raises(Kill):
        search_cnn.run(tiny_search(small_npz, run_dir, epochs=1), on_epoch_end=kill)
    # As if killed after the epoch's records but before its checkpoint, with a half-written file.
    (run_dir / "checkpoints" / "last.pt").unlink()
    (run_dir / ".metrics.jsonl.x.tmp").write_text("half")
    resumed = search_cnn.run(resume=run_dir)
    assert resumed.genotype == full.genotype
    assert [m["train_loss"] for m in resumed.metrics] == [m["train_loss"] for m in full.metrics]
    assert not list(run_dir.glob(".*.tmp"))


def test_resume_may_raise_max_steps_and_continues(small_npz: Path, tmp_path: Path):
    full = search_cnn.run(tiny_search(small_npz, tmp_path / "full", epochs=2))
    first = search_cnn.run(tiny_search(small_npz, tmp_path / "r", epochs=2, max_steps=2))
    assert [m["epoch"] for m in first.metrics] == [1]
    cfg = search_cnn.resume_config(tmp_path / "r", {"max_steps": None})
    resumed = search_cnn.run(cfg, resume=tmp_path / "r")
    assert [m["step"] for m in resumed.metrics] == [2, 4]
    assert resumed.genotype == full.genotype


def test_a_non_finite_epoch_is_never_checkpointed_or_recorded(small_npz: Path, tmp_path: Path, monkeypatch):
    calls = []
    real = search_cnn._evaluate

    def nan_in_epoch_two(model, stream, max_batches):
        calls.append(1)
        loss, acc = real(model, stream, max_batches)
        return (math.nan if len(calls) == 2 else loss), acc

    monkeypatch.setattr(search_cnn, "_evaluate", nan_in_epoch_two)
    run_dir = tmp_path / "r"
    with pytest.raises(UserError, match=r"epoch 2 \(step 4\) produced a non-finite value \(valid_loss\).*epoch 1"):
        search_cnn.run(tiny_search(small_npz, run_dir, epochs=3))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1


def test_non_finite_state_is_named(tmp_path: Path):
    from dartsnas.rundir import RunDir

    state = {"model": {"cells.0.bn.running_var": torch.tensor([1.0, math.inf])}, "rng": [1, 2]}
    with pytest.raises(UserError, match=r"model.cells.0.bn.running_var.*no checkpoint was written"):
        loop._check_finite({"train_loss": 1.0}, state, 0, 3, RunDir(tmp_path))


def test_damaged_checkpoints_and_weights_are_refused(small_npz: Path, tmp_path: Path):
    from dartsnas.checkpoint import load_checkpoint, save_checkpoint, save_weights

    run_dir = tmp_path / "r"
    search_cnn.run(tiny_search(small_npz, run_dir, epochs=2, max_steps=2))
    ckpt = run_dir / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    state["model"]["alphas_normal"][0, 0] += 1.0  # a changed value under the old checksum
    torch.save(state, ckpt)
    with pytest.raises(UserError, match="is damaged"):
        load_checkpoint(ckpt, "search-cnn")
    ckpt.write_bytes(b"")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        search_cnn.run(resume=run_dir)
    # Weights: a changed tensor, and non-finite weights, are both refused by name.
    model = torch.nn.Linear(2, 2)
    from dartsnas.genotype import get_genotype

    path = tmp_path / "w.safetensors"
    save_weights(path, model, "cifar10", get_genotype("DARTS_V2"), {})
    assert load_weights(path).state_dict.keys() == {"weight", "bias"}
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01  # the last byte belongs to the last tensor's data
    path.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="is damaged"):
        load_weights(path)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    save_weights(path, model, "cifar10", get_genotype("DARTS_V2"), {})
    with pytest.raises(UserError, match="non-finite weights"):
        load_weights(path)
    save_checkpoint(tmp_path / "ok.pt", {"a": torch.ones(2), "b": [1, "x"]})
    assert load_checkpoint(tmp_path / "ok.pt")["b"] == [1, "x"]


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


def test_resume_with_data_that_changes_the_network_is_one_line(tiny_corpus: Path, tmp_path: Path, capsys):
    from dartsnas.engine import search_rnn
    from dartsnas.engine.search_rnn import RNNSearchConfig

    save = tmp_path / "s"
    search_rnn.run(RNNSearchConfig(data=str(tiny_corpus), save=str(save), epochs=2, max_steps=1, eval_batches=1,
                                   **TINY_RNN))
    other = tmp_path / "other"
    other.mkdir()
    for split in ("train", "valid", "test"):
        (other / f"{split}.txt").write_text(" ".join(f"v{i}" for i in range(40)) + "\n" * 3)
    capsys.readouterr()
    assert main(["search", "rnn", "--resume", str(save), "--data", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not match the network" in err and "resume with the data" in err


def test_the_console_shows_the_final_genotype_once(small_npz: Path, tmp_path: Path, capsys):
    save = tmp_path / "r"
    assert main(["search", "cnn", "--data", str(small_npz), "--layers", "3", "--init_channels", "2", "--batch_size",
                 "12", "--epochs", "1", "--save", str(save), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert out.count("genotype = Genotype(") == 1 and out.count("run directory:") == 1
    log = (save / "log.txt").read_text()
    assert "final genotype = Genotype(" in log and "run directory:" in log


@pytest.mark.parametrize("job", ["search", "train"])
def test_a_kill_between_checkpoint_and_records_is_repaired_on_resume(job: str, small_npz: Path, tiny_corpus: Path,
                                                                      tmp_path: Path, monkeypatch):
    if job == "search":
        module, make = search_cnn, lambda save: tiny_search(small_npz, save, epochs=2)
        job_class = search_cnn.CNNSearch
    else:
        module = train_rnn
        job_class = train_rnn.RNNTraining

        def make(save):
            return TrainConfig(data=str(tiny_corpus), save=str(save), epochs=2, max_steps=8, eval_batches=2,
                               test_batch_size=2, **TINY_RNN)
    full = module.run(make(tmp_path / "full"))
    real = job_class.write_epoch

    class Kill(Exception):
        pass

    def killed_in_epoch_one(self, record, finished):
        if record["epoch"] == 1:
            raise Kill
        real(self, record, finished)

    monkeypatch.setattr(job_class, "write_epoch", killed_in_epoch_one)
    with pytest.raises(Kill):
        module.run(make(tmp_path / "cut"))
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert not (cut / "metrics.jsonl").exists() and (cut / "checkpoints" / "last.pt").exists()
    resumed = module.run(resume=cut)

    def strip(metrics):
        return [{k: v for k, v in m.items() if k != "time"} for m in metrics]

    assert strip(resumed.metrics) == strip(full.metrics)
    for name in ("genotypes/epoch_001.json", "best.safetensors", "final.safetensors", "test.json", "genotype.json"):
        if (tmp_path / "full" / name).exists():
            assert (cut / name).exists(), name
    if job == "train":
        a, b = load_weights(tmp_path / "full" / "best.safetensors"), load_weights(cut / "best.safetensors")
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_a_job_may_stop_early_and_a_resume_keeps_it_stopped(small_npz: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(search_cnn.CNNSearch, "stop_reason",
                        lambda self, epoch, record: "constructed stop" if epoch == 0 else None)
    result = search_cnn.run(tiny_search(small_npz, tmp_path / "r", epochs=3))
    assert [m["epoch"] for m in result.metrics] == [1] and result.metrics[0]["stopped"] == "constructed stop"
    assert torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)["finished"]
    monkeypatch.undo()
    again = search_cnn.run(resume=tmp_path / "r")
    assert len(again.metrics) == 1 and again.genotype == result.genotype
