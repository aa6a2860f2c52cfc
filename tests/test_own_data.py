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
    assert load_image_data("folder", str(folder), test=False).test is None  # a search leaves val/ unread
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
    assert main(["train", "cifar10", "--dataset", "folder", "--device", "cpu"]) == 2
    assert "--dataset folder needs --data DIR" in capsys.readouterr().err


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


class Tensors(Dataset):
    """A deterministic Dataset over a folder's in-memory images (float, normalised as the Dataset likes)."""

    def __init__(self, root: Path):
        data = load_image_data("folder", str(root), image_size=8)
        self.x = data.train.x.float() / 255 - 0.5
        self.y = data.train.y
        self.classes = data.classes

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


SMALL = {"layers": 3, "init_channels": 4, "batch_size": 8, "device": "cpu", "plots": False}


def test_search_and_train_python_datasets(folder: Path, tmp_path: Path, capsys):
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    tf = transforms.Compose([transforms.Resize(8), transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.25,) * 3)])
    train_set, val_set = ImageFolder(str(folder / "train"), tf), ImageFolder(str(folder / "val"), tf)
    found = dartsnas.search(train_data=train_set, epochs=1, max_steps=2, eval_batches=1, save=str(tmp_path / "s"),
                            **SMALL)
    assert found.run_dir == tmp_path / "s" and isinstance(found.genotype, dartsnas.Genotype)
    assert len(found.metrics) == 1 and np.isfinite(found.metrics[0]["valid_loss"])
    record = json.loads((found.run_dir / "data.json").read_text())
    assert (record["source"], record["num_classes"], record["classes"], record["mean"]) == ("python", 3, CLASSES, None)
    trained = dartsnas.train(found.genotype, train_data=train_set, valid_data=val_set, test_data=val_set, epochs=1,
                             max_steps=2, auxiliary=False, cutout_length=4, save=str(tmp_path / "t"), **SMALL)
    assert trained.test is not None and trained.test.images == 12
    assert trained.metrics[-1]["valid_acc"] == trained.test.top1  # the same images, the same final weights
    assert dartsnas.load_model(trained.run_dir)(torch.rand(1, 3, 8, 8)).shape == (1, 3)
    # The command line cannot repeat a Dataset's transform: it says so instead of testing with another one.
    assert main(["test", "cifar10", "--model_path", str(trained.run_dir), "--data", str(folder)]) == 2
    assert "trained on a Python Dataset" in capsys.readouterr().err
    # Nor resume it: the run needs its Dataset again.
    assert main(["search", "cnn", "--resume", str(found.run_dir), "--max_steps", "4"]) == 2
    assert "started on a Python Dataset" in capsys.readouterr().err


def test_bad_python_data_is_one_line(folder: Path, tmp_path: Path):
    items = [(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)] * 4
    with pytest.raises(UserError, match="images must be float tensors C x H x W"):
        dartsnas.search(train_data=items, num_classes=2, epochs=1, **SMALL)
    unlabelled = [(torch.zeros(3, 8, 8), i % 2) for i in range(20)]
    with pytest.raises(UserError, match=r"neither .classes nor .targets; pass num_classes=N"):
        dartsnas.search(train_data=unlabelled, epochs=1, **SMALL)
    with pytest.raises(UserError, match="label 1, outside 0..0|1 class"):
        dartsnas.search(train_data=unlabelled, num_classes=1, epochs=1, **SMALL)
    with pytest.raises(UserError, match="unknown setting 'epoch'; did you mean 'epochs'"):
        dartsnas.search(train_data=unlabelled, epoch=1)
    with pytest.raises(UserError, match="unknown network"):
        dartsnas.train("DARTS", network="mnist")


def test_genotype_parse_and_derive():
    g = dartsnas.get_genotype("DARTS_V2")
    assert dartsnas.Genotype.parse("DARTS_V2") == g and dartsnas.Genotype.parse(str(g)) == g
    assert dartsnas.Genotype.parse(g.to_json()) == g
    # One-hot weights derive exactly the cell they encode.
    from dartsnas.genotype import CNN_PRIMITIVES

    def one_hot(edges):
        rows = []
        for node in range(4):
            for j in range(node + 2):
                row = [0.0] * len(CNN_PRIMITIVES)
                chosen = [op for op, i in edges[2 * node:2 * node + 2] if i == j]
                row[CNN_PRIMITIVES.index(chosen[0]) if chosen else 0] = 1.0
                rows.append(row)
        return rows

    derived = dartsnas.Genotype.derive(torch.tensor(one_hot(g.normal)), one_hot(g.reduce))
    assert sorted(derived.normal) == sorted(g.normal) and sorted(derived.reduce) == sorted(g.reduce)
    assert derived.normal_concat == (2, 3, 4, 5)
    with pytest.raises(UserError, match="2 \\+ 3 \\+ ... rows"):
        dartsnas.Genotype.derive([[1.0] * 8] * 6, [[1.0] * 8] * 6)


@pytest.mark.slow
def test_folder_search_resumes_bit_for_bit(folder: Path, tmp_path: Path, capsys):
    args = ["search", "cnn", "--dataset", "folder", "--data", str(folder), *TINY, "--epochs", "2", "--eval_batches",
            "1", "--seed", "3"]
    assert main([*args, "--save", str(tmp_path / "whole")]) == 0
    assert main([*args, "--max_steps", "3", "--save", str(tmp_path / "cut")]) == 0  # stops after epoch 1
    assert main(["search", "cnn", "--resume", str(tmp_path / "cut"), "--max_steps", "100"]) == 0
    whole = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    cut = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(line).items() if k != "time"} for line in whole]
    assert strip == [{k: v for k, v in json.loads(line).items() if k != "time"} for line in cut]
    # Changed classes are refused, not trained into the wrong head.
    other = tmp_path / "other"
    import shutil

    shutil.copytree(folder / "train", other)
    (other / "airplane").rename(other / "aeroplane")
    assert main(["search", "cnn", "--resume", str(tmp_path / "cut"), "--data", str(other)]) == 2
    assert "the data's classes changed since the run started" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dataset_search_resumes_bit_for_bit(folder: Path, tmp_path: Path):
    data = Tensors(folder / "train")
    settings = {**SMALL, "epochs": 2, "eval_batches": 1, "seed": 3}
    whole = dartsnas.search(train_data=data, save=str(tmp_path / "whole"), **settings)
    dartsnas.search(train_data=data, save=str(tmp_path / "cut"), max_steps=3, **settings)
    again = dartsnas.search(train_data=data, resume=str(tmp_path / "cut"), max_steps=100)
    assert str(again.genotype) == str(whole.genotype)
    assert [{k: v for k, v in m.items() if k != "time"} for m in again.metrics] == \
        [{k: v for k, v in m.items() if k != "time"} for m in whole.metrics]


@pytest.mark.slow
def test_folder_training_resumes_bit_for_bit(folder: Path, tmp_path: Path):
    args = ["train", "cifar10", "--dataset", "folder", "--data", str(folder), *TINY, "--epochs", "2", "--no-auxiliary",
            "--cutout_length", "4", "--valid_size", "6", "--arch", "DARTS_V1"]
    assert main([*args, "--save", str(tmp_path / "whole")]) == 0
    assert main([*args, "--max_steps", "4", "--save", str(tmp_path / "cut")]) == 0  # 30 images: 4 steps an epoch
    assert main(["train", "cifar10", "--resume", str(tmp_path / "cut"), "--max_steps", "100"]) == 0

    def records(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in ("time", "train_images_per_s")} for line in lines]

    whole, cut = records("whole"), records("cut")
    assert whole[-1] == cut[-1]  # the final test included
    # The cut run also tested after its first epoch, where --max_steps ended it.
    assert whole[0] == {k: v for k, v in cut[0].items() if not k.startswith("test_")}
    assert (tmp_path / "cut" / "best.safetensors").is_file()


def test_damaged_data_records_are_one_line(tmp_path: Path):
    from dartsnas.checkpoint import load_weights, save_weights
    from dartsnas.engine.evaluate_cnn import trained_data

    net = dartsnas.create_model("DARTS", "cifar10", num_classes=3, init_channels=4, layers=3)
    good = {"source": "folder", "name": "x", "num_classes": 3, "classes": CLASSES, "in_channels": 3,
            "image_size": [8, 8], "mean": [0.5] * 3, "std": [0.25] * 3}
    for record, ok in ((good, True), ({**good, "mean": [0.5]}, False), ({**good, "image_size": "8"}, False),
                       ({**good, "num_classes": None}, False), ("[", False)):
        path = tmp_path / "w.safetensors"
        save_weights(path, net, "cifar10", dartsnas.get_genotype("DARTS"), {},
                     {"data": record if isinstance(record, str) else json.dumps(record)})
        if ok:
            assert trained_data(load_weights(path), str(path)) == good
        else:
            with pytest.raises(UserError, match="damaged metadata"):
                trained_data(load_weights(path), str(path))
