"""Shared fixtures: the real data folder, tiny settings, deterministic seeds."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

# Tiny test networks run fastest on one thread, and several threads per process thrash when the
# machine is busy; subprocesses started by tests inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# One setting finds the real data sets (PTB, WikiText-2, CIFAR-10 samples).
DATA_DIR = Path(os.environ.get("DARTSNAS_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data folder {DATA_DIR} not found (set DARTSNAS_DATA)")
    return DATA_DIR


@pytest.fixture
def cifar_train_npz(data_dir: Path) -> Path:
    path = data_dir / "cifar10" / "cifar10_train_first4000_exact.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found (set DARTSNAS_DATA)")
    return path


@pytest.fixture
def cifar_head(cifar_train_npz: Path, tmp_path: Path) -> Callable[[int], Path]:
    """Writes the first n real CIFAR-10 training images to an .npz of their own (tiny searches and trainings)."""

    def write(n: int) -> Path:
        with np.load(cifar_train_npz) as f:
            x, y = f["x"][:n], f["y"][:n]
        path = tmp_path / f"cifar_first{n}.npz"
        np.savez(path, x=x, y=y)
        return path

    return write


@pytest.fixture
def cifar_test_npz(data_dir: Path) -> Path:
    path = data_dir / "cifar10" / "cifar10_test_first1000_exact.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found (set DARTSNAS_DATA)")
    return path


@pytest.fixture
def ptb_dir(data_dir: Path) -> Path:
    path = data_dir / "penn"
    if not (path / "train.txt").is_file():
        pytest.skip(f"{path} not found (set DARTSNAS_DATA)")
    return path


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A small generated word corpus in the PTB layout (train/valid/test.txt)."""
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(20)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, lines in (("train", 120), ("valid", 40), ("test", 40)):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(lines))
        (folder / f"{split}.txt").write_text(text + "\n")
    return folder


@pytest.fixture
def reference_dir() -> Path:
    """Key lists (name and shape) of the authors' released checkpoints, next to the data folder."""
    path = Path(os.environ.get("DARTSNAS_REFERENCE", DATA_DIR.parent / "reference"))
    if not (path / "state_dict_keys_cifar.txt").is_file():
        pytest.skip(f"reference key lists not found in {path} (set DARTSNAS_REFERENCE)")
    return path
