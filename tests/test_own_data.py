"""Your own data: an image folder (--dataset folder) and Python Datasets, searched on and trained on end to end,
the class count recorded and used again by resume, test and load_model; bad folders are one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import dartsnas
from dartsnas.cli import main
from dartsnas.data.folder import read_image_folder
from dartsnas.data.images import channel_stats, load_image_data
from dartsnas.errors import UserError

CLASSES = ["airplane", "automobile", "bird"]  # CIFAR-10 labels 0, 1, 2
TINY = ["--layers", "3", "--init_channels", "4", "--batch_size", "8", "--device", "cpu", "--no-plots",
        "--image_size", "8"]


def write_folder(root: Path, x: np.ndarray, y: np.ndarray, per_class: int, start: int = 0) -> Path:
    """``per_class`` real CIFAR-10 images of each of the first three classes as PNGs in class folders."""
    from PIL import Image

    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(y == label)[start:start + per_class]:
            Image.fromarray(x[i]).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def cifar(cifar_train_npz: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(cifar_train_npz) as f:
        return f["x"], f["y"]


@pytest.fixture
def folder(tmp_path: Path, cifar) -> Path:
    """train/ (12 images per class) and val/ (4 per class), disjoint."""
    x, y = cifar
    write_folder(tmp_path / "images" / "train", x, y, 12)
    write_folder(tmp_path / "images" / "val", x, y, 4, start=12)
    return tmp_path / "images"


def test_folder_reads_exact_pixels_labels_and_classes(folder: Path, cifar):
    x, y = cifar
    data = load_image_data("folder", str(folder))
    assert data.classes == CLASSES and data.num_classes == 3
    assert tuple(data.train.x.shape) == (36, 3, 32, 32) and tuple(data.test.x.shape) == (12, 3, 32, 32)
    # Every image is a CIFAR-10 image of its label, pixel for pixel (PNG is lossless).
    wanted = {x[i].tobytes(): int(y[i]) for i in np.flatnonzero(y < 3)}
    for image, label in zip(data.train.x, data.train.y):
        assert wanted[image.permute(1, 2, 0).numpy().tobytes()] == int(label)
    # Stored in a fixed shuffled order, so that a split in order keeps every class on both sides.
    assert set(data.train.y[:18].tolist()) == {0, 1, 2} and set(data.train.y[18:].tolist()) == {0, 1, 2}
    assert data.mean == channel_stats(data.train.x)[0]  # normalised with the training images' statistics
    resized = load_image_data("folder", str(folder), image_size=8)
    assert tuple(resized.train.x.shape[1:]) == (3, 8, 8) and tuple(resized.test.x.shape[1:]) == (3, 8, 8)


def test_channel_stats_match_the_floating_point_definition():
    x = torch.randint(0, 256, (50, 3, 5, 7), dtype=torch.uint8)
    mean, std = channel_stats(x)
    xf = x.double() / 255
    assert np.allclose(mean, xf.mean(dim=(0, 2, 3)).tolist(), rtol=1e-12)
    assert np.allclose(std, xf.std(dim=(0, 2, 3)).tolist(), rtol=1e-12)


def test_bad_folders_are_one_line(tmp_path: Path, cifar):
    from PIL import Image

    x, y = cifar
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no class folders"):
        read_image_folder(empty)
    one = write_folder(tmp_path / "one", x, y, 2)
    for name in CLASSES[1:]:
        for f in (one / name).iterdir():
            f.unlink()
        (one / name).rmdir()
    with pytest.raises(UserError, match="one class folder.*at least two classes"):
        read_image_folder(one)
    no_images = write_folder(tmp_path / "noimg", x, y, 2)
    (no_images / "extra").mkdir()
    with pytest.raises(UserError, match="extra holds no images"):
        read_image_folder(no_images)
    stray = write_folder(tmp_path / "stray", x, y, 2)
    (stray / "bird" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"notes.txt is not an image file"):
        read_image_folder(stray)
    broken = write_folder(tmp_path / "broken", x, y, 2)
    (broken / "bird" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"cannot read .*bad.png as an image"):
        read_image_folder(broken)
    mixed = write_folder(tmp_path / "mixed", x, y, 2)
    Image.fromarray(x[0]).resize((40, 30)).save(mixed / "bird" / "big.png")
    with pytest.raises(UserError, match="images differ in size.*--image_size N"):
        read_image_folder(mixed)
    assert tuple(read_image_folder(mixed, image_size=16).train.x.shape[1:]) == (3, 16, 16)
    with pytest.raises(UserError, match="above the 0.0 GiB.*--image_size"):
        read_image_folder(mixed, max_bytes=1000)
    with pytest.raises(UserError, match="does not exist"):
        read_image_folder(tmp_path / "missing")


def test_bad_folders_are_one_line_on_the_command_line(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["search", "cnn", "--dataset", "folder", "--data", str(tmp_path / "empty"), *TINY,
                 "--save", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dartsnas: error:") and "holds no class folders" in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # a run that never started leaves nothing behind
    assert main(["search", "cnn", "--image_size", "8", "--dataset", "digits", "--device", "cpu"]) == 2
    assert "--image_size applies to --dataset folder only" in capsys.readouterr().err


def test_search_and_train_a_folder_from_the_command_line(folder: Path, tmp_path: Path, capsys):
    search_dir, train_dir = tmp_path / "search", tmp_path / "train"
    assert main(["search", "cnn", "--dataset", "folder", "--data", str(folder), *TINY, "--epochs", "1",
                 "--max_steps", "2", "--eval_batches", "1", "--save", str(search_dir)]) == 0
    record = json.loads((search_dir / "data.json").read_text())
    assert (record["source"], record["num_classes"], record["classes"]) == ("folder", 3, CLASSES)
    assert record["image_size"] == [8, 8]
    assert main(["train", "cifar10", "--arch", str(search_dir), "--dataset", "folder", "--data", str(folder), *TINY,
                 "--epochs", "1", "--max_steps", "2", "--no-auxiliary", "--cutout_length", "4",
                 "--save", str(train_dir)]) == 0
    out = capsys.readouterr().out
    assert "on 12 images" in out  # the final test ran on val/
    model = dartsnas.load_model(train_dir)
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 3)  # the head of the folder's three classes
    assert main(["test", "cifar10", "--model_path", str(train_dir / "final.safetensors"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"test images: 12 ({folder / 'val'})" in out
    metrics = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    # The command reproduces the run's own final test number: same images, same normalisation.
    assert f"accuracy {metrics[-1]['test_acc']:.2f}%" in out
