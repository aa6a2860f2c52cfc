"""ImageNet trees holding only some of the 1000 class folders: each folder scores as its standard class."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import dartsnas
from dartsnas.checkpoint import load_weights
from dartsnas.cli import main
from dartsnas.data.imagenet import imagenet_wnids, load_image_folder
from dartsnas.engine.evaluate_cnn import TestConfig, run_test
from dartsnas.models.cnn import NetworkImageNet

# Standard indices 0 (tench), 207 (golden retriever) and 999 (toilet tissue).
SUBSET = {"n01440764": 0, "n02099601": 207, "n15075141": 999}


def make_tree(root: Path, splits: dict[str, list[str]], per_class: int = 2) -> Path:
    """Small images (JPEG and PNG) in the ImageFolder layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (36, 40, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(folder / (f"img{i}.JPEG" if (c + i) % 2 else f"img{i}.png"))
    return root


def test_the_packaged_wnid_list_is_the_standard_one():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert all(wnids[i] == w for w, i in SUBSET.items())


def test_a_subset_is_labelled_by_the_standard_index(tmp_path: Path):
    root = make_tree(tmp_path / "sub", {"train": ["n01440764", "n15075141"], "val": list(SUBSET)})
    data = load_image_folder(root, 32, train=True, labels="auto")
    assert data.standard and data.num_classes == 1000
    assert data.val.targets == [0, 0, 207, 207, 999, 999]  # type: ignore[attr-defined]
    assert data.train.targets == [0, 0, 999, 999]  # type: ignore[attr-defined]
    _, label = data.val[2]
    assert label == 207
    # The held-out training images (--valid_size) are labelled the same way.
    from dartsnas.engine.train_cnn import ImageNetTrainConfig, _ImageNetData

    held = _ImageNetData(ImageNetTrainConfig(data=str(root), valid_size=2, image_size=32, workers=0), torch.device("cpu"))
    assert held.num_classes == 1000 and set(held.valid_set.dataset.targets) == {0, 999}  # type: ignore[union-attr]
    # --labels folders keeps one class per folder, and then needs the same folders in train/ and val/.
    with pytest.raises(dartsnas.UserError, match="different class folders"):
        load_image_folder(root, 32, train=True, labels="folders")
    assert load_image_folder(root, 32, train=False, labels="folders").val.targets == [0, 0, 1, 1, 2, 2]  # type: ignore[attr-defined]


def test_test_imagenet_scores_a_subset_against_a_1000_class_network(tmp_path: Path, capsys):
    root = make_tree(tmp_path / "sub", {"val": list(SUBSET)})
    net = NetworkImageNet(4, 1000, 3, False, dartsnas.get_genotype("DARTS"))
    with torch.no_grad():
        # Whatever the image: class 207 first, then 0 and 999, so the answers are known.
        net.classifier.weight.zero_()
        net.classifier.bias.zero_()
        net.classifier.bias[[207, 0, 999]] = torch.tensor([3.0, 2.0, 1.0])
    weights = tmp_path / "imagenet_model.pt"
    torch.save(net.state_dict(), weights)
    result = run_test(TestConfig(model_path=str(weights), arch="DARTS", data=str(root), workers=0, image_size=32,
                                 threads=1), "imagenet")
    assert result.images == 6
    assert result.top1 == pytest.approx(100 * 2 / 6)  # the two golden retrievers (folder 1, class 207)
    assert result.top5 == pytest.approx(100.0)

    other = make_tree(tmp_path / "other", {"val": ["cats", "dogs"]})
    assert main(["test", "imagenet", "--model_path", str(weights), "--arch", "DARTS", "--data", str(other),
                 "--workers", "0", "--image_size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not named by ImageNet WordNet ids (e.g. 'cats')" in err


def test_train_imagenet_on_a_subset_trains_the_1000_class_network(tmp_path: Path, capsys):
    root = make_tree(tmp_path / "sub", {"train": list(SUBSET), "val": ["n02099601", "n15075141"]})
    save = tmp_path / "run"
    assert main(["train", "imagenet", "--data", str(root), "--no-auxiliary", "--layers", "3", "--init_channels", "4",
                 "--batch_size", "3", "--epochs", "1", "--max_steps", "1", "--workers", "0", "--image_size", "32",
                 "--save", str(save), "--no-plots", "--threads", "1"]) == 0
    assert load_weights(save / "final.safetensors").state_dict["classifier.weight"].shape[0] == 1000
    capsys.readouterr()
    # Its weights test on the subset (and would on the full validation set) without further flags.
    assert main(["test", "imagenet", "--model_path", str(save / "final.safetensors"), "--workers", "0"]) == 0
    assert "test images: 4" in capsys.readouterr().out
    # A run stored before --labels existed numbered its folders: resuming it keeps doing so.
    import yaml

    from dartsnas.engine.train_cnn import resume_config

    assert resume_config(save, {}).labels == "auto"
    stored = yaml.safe_load((save / "config.yaml").read_text())
    del stored["config"]["labels"]
    (save / "config.yaml").write_text(yaml.safe_dump(stored))
    assert resume_config(save, {}).labels == "folders"
