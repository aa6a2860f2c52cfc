"""``dartsnas train cifar10|imagenet``, ``test cifar10|imagenet`` and ``info`` end to end."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_models_cnn import reference_state

from dartsnas.cli import main
from dartsnas.config import make_config
from dartsnas.engine.evaluate_cnn import TestConfig, run_test
from dartsnas.engine.train_cnn import CifarTrainConfig, ImageNetTrainConfig, run
from dartsnas.genotype import get_genotype


def subset_npz(src: Path, dst: Path, n: int) -> Path:
    with np.load(src) as f:
        np.savez(dst, x=f["x"][:n], y=f["y"][:n])
    return dst


def tiny(data: Path, save: Path, **kw) -> CifarTrainConfig:
    args = {"data": str(data), "save": str(save), "layers": 3, "init_channels": 4, "batch_size": 16, "epochs": 2,
            "plots": False, "threads": 1, "report_freq": 1000}
    args.update(kw)
    return CifarTrainConfig(**args)


# Slow: 300 steps on real images (about 22 s); the tiny runs below and test_evaluate_cnn_data.py cover train and test
# by default.
@pytest.mark.slow
def test_short_training_learns_and_test_reproduces_the_final_accuracy(cifar_train_npz: Path, cifar_test_npz: Path,
                                                                     tmp_path: Path, capsys):
    train = subset_npz(cifar_train_npz, tmp_path / "train.npz", 2400)
    save = tmp_path / "run"
    # 2 epochs x 150 steps of batch 16 on real CIFAR-10 images.
    rc = main(["train", "cifar10", "--data", str(train), "--test_data", str(cifar_test_npz), "--layers", "3",
               "--init-channels", "8", "--batch_size", "16", "--epochs", "2", "--learning_rate", "0.05",
               "--no-auxiliary", "--no-cutout", "--drop_path_prob", "0", "--save", str(save), "--no-plots",
               "--threads", "1", "--report_freq", "1000"])
    assert rc == 0
    out = capsys.readouterr().out
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[-1]["step"] == 300
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"] - 0.2
    final = metrics[-1]
    assert final["test_loss"] < math.log(10) - 0.2  # an untrained 10-way classifier scores about ln 10
    assert final["test_acc"] > 18.0  # chance is 10 %; 1000 test images put 18 % eight deviations above it
    assert "test_loss" not in metrics[0]  # the test split is looked at once, after training
    assert f"accuracy {final['test_acc']:.2f}%" in out

    rc = main(["test", "cifar10", "--model-path", str(save / "final.safetensors"), "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"test error: {100 - final['test_acc']:.2f}%" in out
    assert f"test loss: {final['test_loss']:.4f}" in out
    assert re.search(r"parameters: [\d,]+ ", out) and "images/s" in out


def test_run_directory_and_resume_reproduce_an_uninterrupted_run(cifar_train_npz: Path, tmp_path: Path):
    data = subset_npz(cifar_train_npz, tmp_path / "small.npz", 80)
    # Auxiliary head, cutout and drop path all draw random numbers: resume must restore them all.
    kw = {"valid_size": 16, "drop_path_prob": 0.3, "seed": 3}
    full = run(tiny(data, tmp_path / "full", **kw))

    class Crash(Exception):
        pass

    def crash_after_first(epoch, record):
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        run(tiny(data, tmp_path / "cut", **kw), on_epoch_end=crash_after_first)
    resumed = run(resume=tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert a["finished"] and b["finished"] and a["step"] == b["step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    strip = [{k: v for k, v in m.items() if "time" not in k and "per_s" not in k} for m in full.metrics]
    assert strip == [{k: v for k, v in m.items() if "time" not in k and "per_s" not in k} for m in resumed.metrics]
    assert full.metrics[1]["drop_path_prob"] == pytest.approx(0.15)

    save = tmp_path / "full"
    cfg = yaml.safe_load((save / "config.yaml").read_text())
    assert cfg["command"] == "train-cifar10" and cfg["config"]["valid_size"] == 16
    assert json.loads((save / "genotype.json").read_text()) == get_genotype("DARTS_V2").to_dict()
    assert {"valid_acc", "valid_loss", "train_acc", "lr"} <= set(full.metrics[0])
    assert (save / "best.safetensors").is_file() and (save / "final.safetensors").is_file()
    assert "train_loss" in (save / "log.txt").read_text()


def test_architecture_from_a_genotype_file_or_printed_string(cifar_train_npz: Path, tmp_path: Path):
    data = subset_npz(cifar_train_npz, tmp_path / "small.npz", 32)
    printed = str(get_genotype("DARTS_V1"))
    result = run(tiny(data, tmp_path / "a", arch=printed, epochs=1, auxiliary=False))
    assert result.genotype == get_genotype("DARTS_V1")
    search_dir = tmp_path / "search"
    search_dir.mkdir()
    (search_dir / "genotype.json").write_text(json.dumps(get_genotype("NASNet").to_dict()))
    result = run(tiny(data, tmp_path / "b", arch=str(search_dir), epochs=1, max_steps=1, auxiliary=False))
    assert result.genotype == get_genotype("NASNet")
    # The weights carry their genotype: no --arch needed to test them.
    res = run_test(TestConfig(model_path=str(tmp_path / "b" / "final.safetensors"), data=str(data),
                              test_data=str(data), threads=1), "cifar10")
    assert res.images == 32


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A tiny ImageNet-style tree: 3 classes, 4 training and 2 validation images each, 40x48 pixels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    for split, n in (("train", 4), ("val", 2)):
        for c in range(3):
            folder = root / split / f"n0000{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (40, 48, 3)) + np.array([0, 0, 0])
                pixels[..., c] += 150  # one dominant colour per class
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img{i}.png")
    return root


def test_imagenet_end_to_end_on_a_tiny_image_folder(image_folder: Path, tmp_path: Path, capsys):
    save = tmp_path / "run"
    rc = main(["train", "imagenet", "--data", str(image_folder), "--auxiliary", "--layers", "3", "--init_channels",
               "8", "--batch_size", "4", "--epochs", "2", "--workers", "0", "--save", str(save), "--no-plots",
               "--threads", "1", "--drop_path_prob", "0.1"])
    assert rc == 0
    capsys.readouterr()
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3, 6]
    final = metrics[-1]
    assert {"test_acc", "test_acc_top5", "test_loss"} <= set(final)
    assert metrics[1]["lr"] == pytest.approx(0.1 * 0.97)
    rc = main(["test", "imagenet", "--model-path", str(save / "final.safetensors"), "--workers", "0",
               "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "test images: 6" in out
    assert f"top-1 {100 - final['test_acc']:.2f}%  top-5 {100 - final['test_acc_top5']:.2f}%" in out
    assert f"test loss: {final['test_loss']:.4f}" in out


def test_released_cifar_checkpoint_layout_is_tested_directly(reference_dir: Path, cifar_test_npz: Path,
                                                            tmp_path: Path, capsys):
    path = tmp_path / "cifar10_model.pt"
    state = reference_state(reference_dir / "state_dict_keys_cifar.txt")
    torch.save(state, path, _use_new_zipfile_serialization=False)
    rc = main(["test", "cifar10", "--model_path", str(path), "--arch", "DARTS", "--auxiliary", "--data",
               str(cifar_test_npz), "--batch_size", "4", "--eval_batches", "1", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "test images: 4" in out and "parameters: 3,349,342" in out


def test_one_line_errors(image_folder: Path, cifar_train_npz: Path, tmp_path: Path, capsys):
    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dartsnas: error: ") and "\n" not in err, err
        return err

    common = ["--data", str(cifar_train_npz), "--save", str(tmp_path / "x"), "--no-plots"]
    assert "unknown architecture 'NoSuchNet'" in error(["train", "cifar10", "--arch", "NoSuchNet", *common])
    assert "recurrent (RNN) genotype" in error(["train", "cifar10", "--arch", "DARTS_V2_RNN", *common])
    (image_folder / "val").rename(image_folder / "validation")
    assert "has no val/ folder" in error(["train", "imagenet", "--data", str(image_folder), "--save",
                                         str(tmp_path / "y")])

    weights = tmp_path / "w.pt"
    from dartsnas.models.cnn import NetworkCIFAR

    torch.save(NetworkCIFAR(8, 10, 5, False, get_genotype("DARTS_V2")).state_dict(), weights)
    msg = error(["test", "cifar10", "--model-path", str(weights), "--arch", "DARTS_V1", "--data", str(cifar_train_npz)])
    assert re.search(r"cells\.\d+\.\S+ .*(\d+x)+\d+", msg), msg
    assert "use dartsnas test cifar10" in error(["test", "imagenet", "--model-path", str(weights)])


def test_presets_are_the_paper_defaults():
    assert make_config(CifarTrainConfig, None, "train-cifar10-paper") == CifarTrainConfig()
    assert make_config(ImageNetTrainConfig, None, "train-imagenet-paper") == ImageNetTrainConfig()
    cfg = ImageNetTrainConfig()
    assert (cfg.layers, cfg.init_channels, cfg.batch_size, cfg.epochs, cfg.label_smooth) == (14, 48, 128, 250, 0.1)


def test_info_prints_parameters_and_multiply_adds(capsys):
    assert main(["info", "DARTS", "--dataset", "imagenet"]) == 0
    out = capsys.readouterr().out
    assert "4,718,752" in out
    madds = float(re.search(r"multiply-adds: ([\d.]+)M", out).group(1))
    assert 500 < madds < 600  # the paper reports 574M; counters that add BN and pooling land in between
    assert main(["info", "DARTS_V2"]) == 0
    assert "3,349,342" in capsys.readouterr().out


def test_mixed_precision_and_memory_format_choices():
    from dartsnas.engine.evaluate_cnn import resolve_amp, use_channels_last
    from dartsnas.errors import UserError

    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    with pytest.raises(UserError, match="needs a CUDA device"):
        resolve_amp("bf16", cpu)
    assert use_channels_last("auto", cpu, None) and use_channels_last("on", cpu, None)
    assert not use_channels_last("off", cpu, None)
    cuda = torch.device("cuda")
    assert use_channels_last("auto", cuda, torch.bfloat16) and not use_channels_last("auto", cuda, None)
