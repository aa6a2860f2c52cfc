"""kill -9 at several moments of a run, then ``--resume`` until it is done: the result is bit-identical
to an uninterrupted run and nothing is lost (the run directory's records match, the lock is free)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dartsnas.rundir import RunDir

pytestmark = pytest.mark.slow

SEARCH = ["search", "cnn", "--dataset", "digits", "--layers", "3", "--init_channels", "2", "--nodes", "2",
          "--batch_size", "64", "--epochs", "3", "--seed", "1", "--no-plots", "--threads", "1"]


def _train(corpus: Path) -> list[str]:
    return ["train", "ptb", "--data", str(corpus), "--emsize", "8", "--nhid", "8", "--nhidlast", "8",
            "--batch_size", "4", "--bptt", "5", "--epochs", "4", "--eval_batches", "3", "--test_batch_size", "2",
            "--no-plots", "--threads", "1"]


def _dartsnas(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dartsnas", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def _finish(args: list[str], run_dir: Path) -> None:
    """Continue a killed run the way a user would, until it reports success."""
    for _ in range(3):
        rd = RunDir(run_dir)
        cmd = [*args[:2], "--resume", str(run_dir)] if rd.config.is_file() else [*args, "--save", str(run_dir)]
        proc = _dartsnas(cmd)
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            return
        assert "error" in err, err
    raise AssertionError(f"the run in {run_dir} could not be completed: {err}")


def _outcome(run_dir: Path) -> dict:
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    files = {name: (run_dir / name).read_text() for name in ("genotype.json", "test.json") if (run_dir / name).exists()}
    metrics = [{k: v for k, v in json.loads(line).items() if k not in ("time", "train_images_per_s")}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"model": state["model"], "step": state["step"], "files": files, "metrics": metrics}


@pytest.mark.parametrize("job", ["search", "train"])
def test_kill_nine_then_resume_is_bit_identical(job: str, tmp_path: Path, tiny_corpus: Path):
    args = SEARCH if job == "search" else _train(tiny_corpus)
    reference = tmp_path / "reference"
    proc = _dartsnas([*args, "--save", str(reference)])
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    duration = time.monotonic() - t0
    expected = _outcome(reference)
    # Kill points spread over the run: start-up, the first epochs, and near the end (around the final
    # checkpoint and the result files).
    for k, fraction in enumerate((0.3, 0.55, 0.8, 0.95)):
        run_dir = tmp_path / f"killed{k}"
        proc = _dartsnas([*args, "--save", str(run_dir)])
        time.sleep(duration * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        _finish(args, run_dir)
        got = _outcome(run_dir)
        assert got["step"] == expected["step"] and got["files"] == expected["files"], fraction
        assert got["metrics"] == expected["metrics"], fraction
        for key, value in expected["model"].items():
            assert torch.equal(got["model"][key], value), (fraction, key)
        assert not RunDir(run_dir).lock_file.exists() and not list(run_dir.glob(".*.tmp"))
