"""Which CIFAR-10 images ``dartsnas test cifar10`` evaluates, and which ones a training run tests on."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dartsnas.checkpoint import save_weights
from dartsnas.cli import main
from dartsnas.engine.evaluate_cnn import cifar_eval_images, cifar_test_images
from dartsnas.errors import UserError
from dartsnas.genotype import get_genotype
from dartsnas.models.cnn import NetworkCIFAR


def images_npz(path: Path, n: int, value: int, n_test: int = 0) -> Path:
    """``n`` 32x32 RGB images all of grey level ``value`` (so a loaded set shows which file it came from);
    with ``n_test``, also ``x_test``/``y_test`` arrays of level ``value + 1``."""
    arrays = {"x": np.full((n, 32, 32, 3), value, np.uint8), "y": np.arange(n) % 10}
    if n_test:
        arrays.update(x_test=np.full((n_test, 32, 32, 3), value + 1, np.uint8), y_test=np.arange(n_test) % 10)
    np.savez(path, **arrays)
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A training file with a ``*test*.npz`` lying next to it, and a file holding both splits."""
    folder = tmp_path / "cifar"
    folder.mkdir()
    return {"train": images_npz(folder / "train.npz", 7, 10),
            "beside": images_npz(folder / "cifar_test.npz", 5, 20),
            "both": images_npz(tmp_path / "both.npz", 6, 30, n_test=3)}


def level(images) -> int:
    return int(images.x[0, 0, 0, 0])


def test_test_evaluates_exactly_the_file_it_is_given(files):
    images, source = cifar_eval_images(str(files["train"]), None)
    assert (len(images), level(images), source) == (7, 10, str(files["train"]))  # not the *test*.npz beside it
    images, source = cifar_eval_images(str(files["beside"]), None)
    assert (len(images), level(images)) == (5, 20)
    images, source = cifar_eval_images(str(files["both"]), None)
    assert (len(images), level(images), source) == (3, 31, f"{files['both']} (x_test)")
    images, _ = cifar_eval_images(None, str(files["beside"]))
    assert (len(images), level(images)) == (5, 20)
    images, _ = cifar_eval_images(str(files["train"]), str(files["train"]))
    assert len(images) == 7


def test_test_refuses_to_choose_between_two_sources(files, tmp_path: Path):
    with pytest.raises(UserError, match="name different images.*--data FILE.npz"):
        cifar_eval_images(str(files["train"]), str(files["beside"]))
    with pytest.raises(UserError, match="does not exist"):
        cifar_eval_images(str(tmp_path / "missing.npz"), None)


def test_training_tests_on_its_test_split_never_on_its_training_images(files, tmp_path: Path):
    images, source = cifar_test_images(str(files["train"]), None)
    assert (len(images), level(images), source) == (5, 20, str(files["beside"]))
    images, _ = cifar_test_images(str(files["both"]), None)
    assert (len(images), level(images)) == (3, 31)
    images, _ = cifar_test_images(str(files["train"]), str(files["both"]))
    assert (len(images), level(images)) == (3, 31)
    # A training file named like a test file is still the training set: nothing else to test on.
    alone = tmp_path / "alone"
    alone.mkdir()
    named_test = images_npz(alone / "my_test.npz", 4, 40)
    assert cifar_test_images(str(named_test), None, required=False) == (None, "")
    with pytest.raises(UserError, match="pass --data FILE.npz"):
        cifar_test_images(str(named_test), None, flag="--data")


def test_command_line_reports_the_file_it_evaluated(files, tmp_path: Path, capsys):
    torch.manual_seed(0)
    model = NetworkCIFAR(4, 10, 3, False, get_genotype("DARTS"))
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    base = ["test", "cifar10", "--model_path", str(weights), "--arch", "DARTS", "--threads", "1"]
    assert main([*base, "--data", str(files["train"])]) == 0
    assert f"test images: 7 ({files['train']})" in capsys.readouterr().out
    assert main([*base, "--test_data", str(files["both"])]) == 0
    assert f"test images: 3 ({files['both']} (x_test))" in capsys.readouterr().out
    assert main([*base, "--data", str(files["train"]), "--test_data", str(files["beside"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "name different images" in err

    # Weights that name their training run: with no --data, the images that run tested on.
    run_weights = tmp_path / "final.safetensors"
    save_weights(run_weights, model, "cifar10", get_genotype("DARTS"), {"data": str(files["train"]),
                                                                        "test_data": None})
    assert main(["test", "cifar10", "--model_path", str(run_weights), "--threads", "1"]) == 0
    assert f"test images: 5 ({files['beside']})" in capsys.readouterr().out
    assert main(["test", "cifar10", "--model_path", str(run_weights), "--threads", "1", "--data",
                 str(files["train"])]) == 0
    assert re.search(rf"test images: 7 \({re.escape(str(files['train']))}\)", capsys.readouterr().out)
