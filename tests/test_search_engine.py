"""``dartsnas search cnn`` end to end: run directory, resume, command-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dartsnas.cli import main
from dartsnas.engine.search_cnn import SearchConfig, run


@pytest.fixture
def small_npz(cifar_train_npz: Path, tmp_path: Path) -> Path:
    """The first 48 real CIFAR-10 training images: two steps of batch 12 per stream."""
    with np.load(cifar_train_npz) as f:
        x, y = f["x"][:48], f["y"][:48]
    path = tmp_path / "small.npz"
    np.savez(path, x=x, y=y)
    return path


def tiny_config(data: Path, save: Path, **kw) -> SearchConfig:
    args = {"data": str(data), "save": str(save), "init_channels": 2, "layers": 3, "batch_size": 12, "epochs": 2,
            "plots": False, "seed": 5}
    args.update(kw)
    return SearchConfig(**args)


def test_search_cli_writes_every_run_dir_file(cifar_train_npz: Path, tmp_path: Path, capsys):
    save = tmp_path / "run"
    rc = main(["search", "cnn", "--data", str(cifar_train_npz), "--layers", "3", "--init-channels", "2",
               "--batch_size", "16", "--epochs", "1", "--max_steps", "2", "--eval_batches", "2", "--save", str(save),
               "--no-plots"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "genotype = Genotype(normal=[" in out
    cfg = yaml.safe_load((save / "config.yaml").read_text())
    assert cfg["command"] == "search-cnn" and "dartsnas_version" in cfg
    assert cfg["config"]["layers"] == 3 and cfg["config"]["batch_size"] == 16
    assert "train_loss" in (save / "log.txt").read_text()
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["step"] == 2
    assert {"train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "time", "genotype"} <= set(metrics[0])
    genotype = json.loads((save / "genotype.json").read_text())
    assert genotype == metrics[0]["genotype"]
    assert json.loads((save / "genotypes" / "epoch_001.json").read_text()) == genotype
    alphas = json.loads((save / "alphas" / "epoch_001.json").read_text())
    assert alphas["primitives"][0] == "none" and len(alphas["normal"]) == 14
    assert all(abs(sum(r) - 1) < 1e-5 for r in alphas["normal"] + alphas["reduce"])
    state = torch.load(save / "checkpoints" / "last.pt", weights_only=True)
    assert state["finished"] and state["step"] == 2
    assert {"model", "w_optimizer", "a_optimizer", "scheduler", "rng", "epoch", "config"} <= set(state)
    assert "alphas_normal" in state["model"]


def test_resume_reproduces_an_uninterrupted_search(small_npz: Path, tmp_path: Path):
    full = run(tiny_config(small_npz, tmp_path / "full"))

    class Crash(Exception):
        pass

    def crash_after_first(epoch, record):
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        run(tiny_config(small_npz, tmp_path / "cut"), on_epoch_end=crash_after_first)
    assert json.loads((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 1
    resumed = run(resume=tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.genotype == full.genotype
    assert [m["train_loss"] for m in resumed.metrics] == [m["train_loss"] for m in full.metrics]
    # Resuming a finished run does nothing.
    again = run(resume=tmp_path / "cut")
    assert again.genotype == full.genotype and len(again.metrics) == 2


def test_second_order_search_runs_and_logs_hvp_check(small_npz: Path, tmp_path: Path):
    result = run(tiny_config(small_npz, tmp_path / "u", unrolled=True, hvp_check=True, epochs=1, max_steps=1))
    record = result.metrics[0]
    assert -1.0 <= record["hvp_cosine"] <= 1.0 and record["implicit_ratio"] > 0
    assert "hvp check: cosine" in (tmp_path / "u" / "log.txt").read_text()


def run_cli(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("args, fragment", [
    (["--train_portion", "1.5"], "--train_portion must be between 0 and 1"),
    (["--data", "/nonexistent/cifar.npz"], "does not exist"),
    (["--layers", "2"], "--layers must be at least 3"),
    (["--dataset", "npz"], "--dataset npz needs --data"),
    (["--config", "/nonexistent.yaml"], "config file /nonexistent.yaml does not exist"),
])
def test_cli_errors_are_one_line(args, fragment, capsys, tmp_path):
    rc, err = run_cli(["search", "cnn", "--save", str(tmp_path / "r"), *args], capsys)
    assert rc == 2
    assert fragment in err and len(err.splitlines()) == 1 and err.startswith("dartsnas: error:")


def test_missing_cifar_suggests_the_offline_demo(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rc, err = run_cli(["search", "cnn", "--no-download", "--save", str(tmp_path / "r")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1
    assert "CIFAR-10 not found" in err and "--dataset digits" in err and str(tmp_path / "cache") in err


def test_bad_genotype_and_config_keys(capsys, tmp_path):
    rc, err = run_cli(["genotypes", "show", ("Genotype(normal=[('conv_9x9', 0), ('skip_connect', 1)], "
                                             "normal_concat=[2], reduce=[('skip_connect', 0), ('skip_connect', 1)], "
                                             "reduce_concat=[2])")], capsys)
    assert rc == 2 and "conv_9x9" in err and len(err.splitlines()) == 1
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 8\nlearning_rat: 0.1\n")
    rc, err = run_cli(["search", "cnn", "--config", str(cfg)], capsys)
    assert rc == 2 and "unknown option 'learning_rat'" in err


def test_config_file_then_flags_precedence(small_npz, tmp_path):
    from dartsnas.cli import build_parser
    from dartsnas.config import make_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("batch_size: 8\nlayers: 5\n")
    args = build_parser().parse_args(["search", "cnn", "--config", str(cfg_file), "--layers", "4"])
    cfg = make_config(SearchConfig, args, args.config)
    assert cfg.batch_size == 8 and cfg.layers == 4 and cfg.epochs == 50


def test_resume_refuses_to_change_the_mathematics(small_npz, tmp_path, capsys):
    run(tiny_config(small_npz, tmp_path / "r", epochs=1, max_steps=1))
    rc, err = run_cli(["search", "cnn", "--resume", str(tmp_path / "r"), "--learning_rate", "0.1"], capsys)
    assert rc == 2 and "--learning_rate cannot change when resuming" in err
    rc, err = run_cli(["search", "cnn", "--save", str(tmp_path / "r"), "--data", str(small_npz)], capsys)
    assert rc == 2 and "--resume" in err


def test_python_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "dartsnas", "genotypes"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0 and "DARTS_V2" in out.stdout and "NASNet" in out.stdout


def test_tensorboard_events_are_written(small_npz, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    run(tiny_config(small_npz, tmp_path / "tb", epochs=1, max_steps=1, tensorboard=True))
    assert list((tmp_path / "tb" / "tb").glob("events.out.tfevents.*"))
