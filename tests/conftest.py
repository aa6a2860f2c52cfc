"""Shared fixtures: the real data folder, tiny settings, deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

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
def cifar_test_npz(data_dir: Path) -> Path:
    path = data_dir / "cifar10" / "cifar10_test_first1000_exact.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found (set DARTSNAS_DATA)")
    return path
