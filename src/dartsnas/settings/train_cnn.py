"""Settings of ``dartsnas train cifar10|imagenet``; the defaults are the paper's (section 3.2, appendix A.2.1 and A.2.3)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import check, option, redefault
from .choices import AMP_CHOICES, NETWORK_DEFAULTS, TRAIN_DATASETS
from .runtime import RESUMABLE_RUN_OPTIONS, RunOptions

_CIFAR = NETWORK_DEFAULTS["cifar10"]
_IMAGENET = NETWORK_DEFAULTS["imagenet"]


def check_folder_options(dataset: str, image_size: int | None, data: str | None) -> None:
    """--dataset folder needs its folder; --image_size resizes its images (the other sources have their
    own size)."""
    check(dataset != "folder" or bool(data), "--dataset folder needs --data DIR (a folder of class sub-folders, "
                                             "or of train/ and val/ folders of them)")
    check(image_size is None or image_size >= 4, f"--image_size must be at least 4, got {image_size}")
    check(image_size is None or dataset == "folder", "--image_size applies to --dataset folder only")


@dataclass
class TrainConfig(RunOptions):
    """Settings shared by both networks; defaults are the CIFAR-10 ones (paper appendix A.2.1)."""

    arch: str = option("DARTS", "architecture: a name (DARTS = DARTS_V2, DARTS_V1, NASNet, AmoebaNet), a "
                                "genotype.json, a search run directory or a printed Genotype(...) string",
                       group="network")
    data: str | None = option(None, "data: CIFAR-10 folder or .npz file / ImageNet folder with train/ and val/",
                              group="data")
    batch_size: int = option(96, "batch size", group="optimisation")
    learning_rate: float = option(0.025, "initial learning rate", group="optimisation", aliases=("--lr",))
    momentum: float = option(0.9, "SGD momentum", group="optimisation")
    weight_decay: float = option(3e-4, "weight decay", group="optimisation")
    epochs: int = option(600, "training epochs", group="optimisation")
    init_channels: int = option(_CIFAR["init_channels"], "initial channels C", group="network")
    layers: int = option(_CIFAR["layers"], "number of cells", group="network")
    auxiliary: bool = option(True, "auxiliary classifier after cell 2*layers//3", group="regularisation")
    auxiliary_weight: float = option(0.4, "weight of the auxiliary loss", group="regularisation")
    drop_path_prob: float = option(0.2, "final drop-path probability (scaled linearly from 0 over the epochs)",
                                   group="regularisation")
    grad_clip: float = option(5.0, "gradient-norm clip", group="optimisation")
    valid_size: int = option(0, "hold out this many training images, evaluated each epoch to pick "
                                "best.safetensors (0: train on all of them, as the paper does)", group="data")
    seed: int = option(0, "random seed", group="optimisation")
    workers: int | None = option(None, "data-loading worker processes (ImageNet; default: up to 8; CIFAR-10 is "
                                       "kept in memory and needs none)", group="runtime")
    amp: str = option("auto", "mixed precision on CUDA: auto (bf16 where supported, else fp16), bf16, fp16 or off; "
                              "always float32 on the CPU", group="speed", choices=AMP_CHOICES)
    channels_last: str = option("auto", "channels-last memory format: auto (CPU, or CUDA with mixed precision), "
                                        "on or off", group="speed", choices=("auto", "on", "off"))
    flip_conv_backward: bool = option(True, "input gradient of size-keeping depthwise convolutions (5x5, dilated) by a "
                                            "convolution with the flipped kernel, and of dilated ones their weight "
                                            "gradient by undilated convolutions of the phase images: several times "
                                            "faster than PyTorch's backward on the CPU, same results (off: PyTorch's)", group="speed")
    deterministic: bool = option(False, "deterministic algorithms only (slower on CUDA; CPU runs are "
                                        "deterministic anyway)", group="runtime")
    sync_bn: bool = option(False, "with several processes on CUDA: batch norm over the global batch (SyncBatchNorm) "
                                  "instead of each process's slice", group="distributed")

    network = "cifar10"

    @property
    def command(self) -> str:
        return f"train-{self.network}"

    def validate(self) -> None:
        check(self.batch_size >= 2, f"--batch_size must be at least 2 (batch norm needs two images), "
                                    f"got {self.batch_size}")
        check(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        for name in ("learning_rate", "grad_clip"):
            value = getattr(self, name)
            check(value > 0 and math.isfinite(value), f"--{name} must be a positive number, got {value}")
        for name in ("momentum", "weight_decay", "auxiliary_weight"):
            value = getattr(self, name)
            check(value >= 0 and math.isfinite(value), f"--{name} must be >= 0, got {value}")
        check(0.0 <= self.drop_path_prob < 1.0, f"--drop_path_prob must be in [0, 1), got {self.drop_path_prob}")
        check(self.init_channels >= 1, f"--init_channels must be at least 1, got {self.init_channels}")
        check(self.layers >= 3, f"--layers must be at least 3 (two of the cells are reduction cells), "
                                f"got {self.layers}")
        check(self.valid_size >= 0, f"--valid_size must be >= 0, got {self.valid_size}")
        super().validate()


@dataclass
class CifarTrainConfig(TrainConfig):
    """``dartsnas train cifar10``: 20 cells, C = 36, 600 epochs, cosine schedule, cutout (paper appendix A.2.1)."""

    dataset: str = option("cifar10", "data source: cifar10 (--data: CIFAR-10 folder or .npz) or folder (--data: your "
                                     "own images in class sub-folders, or train/ and val/ folders of them; val/ is "
                                     "the test split)", group="data", choices=TRAIN_DATASETS)
    image_size: int | None = option(None, "--dataset folder: resize every image to N x N (default: the images' own "
                                          "size, which must then be the same for all)", group="data")
    test_data: str | None = option(None, ".npz file of CIFAR-10 test images for the final evaluation (default: the "
                                         "folder's test batch, the file's x_test, or the single *test*.npz next to "
                                         "--data)", group="data")
    learning_rate_min: float = option(0.0, "final learning rate of the cosine schedule", group="optimisation")
    cutout: bool = option(True, "cutout augmentation", group="regularisation")
    cutout_length: int = option(16, "side of the cutout square", group="regularisation")
    download: bool = option(True, "download CIFAR-10 when it is missing and the network allows", group="data")

    network = "cifar10"

    def validate(self) -> None:
        super().validate()
        check(self.learning_rate_min >= 0, f"--learning_rate_min must be >= 0, got {self.learning_rate_min}")
        check(self.cutout_length >= 1, f"--cutout_length must be at least 1, got {self.cutout_length}")
        check_folder_options(self.dataset, self.image_size, self.data)
        check(self.dataset != "folder" or not self.test_data,
              "--test_data is for CIFAR-10 .npz files; with --dataset folder the test images are DIR/val/")


@dataclass
class ImageNetTrainConfig(TrainConfig):
    """``dartsnas train imagenet``: mobile setting, 14 cells, C = 48, 250 epochs (paper appendix A.2.3)."""

    batch_size: int = redefault(TrainConfig, "batch_size", 128)
    learning_rate: float = redefault(TrainConfig, "learning_rate", 0.1)
    weight_decay: float = redefault(TrainConfig, "weight_decay", 3e-5)
    epochs: int = redefault(TrainConfig, "epochs", 250)
    init_channels: int = redefault(TrainConfig, "init_channels", _IMAGENET["init_channels"])
    layers: int = redefault(TrainConfig, "layers", _IMAGENET["layers"])
    drop_path_prob: float = redefault(TrainConfig, "drop_path_prob", 0.0)
    label_smooth: float = option(0.1, "label smoothing of the training loss", group="regularisation")
    gamma: float = option(0.97, "learning-rate decay factor", group="optimisation")
    decay_period: int = option(1, "epochs between two learning-rate decays", group="optimisation")
    image_size: int = option(224, "training crop size (evaluation resizes to 256/224 of it, then centre-crops)",
                             group="data")
    labels: str = option("auto", "class labels: imagenet (the standard index of the 1000 ImageNet classes, so a "
                                 "subset of ImageNet folders trains a 1000-class network), folders (one class per "
                                 "folder, in sorted order) or auto (imagenet when every class folder is named by an "
                                 "ImageNet WordNet id, else folders)", group="data",
                         choices=("auto", "imagenet", "folders"))

    network = "imagenet"

    def validate(self) -> None:
        super().validate()
        check(0.0 <= self.label_smooth < 1.0, f"--label_smooth must be in [0, 1), got {self.label_smooth}")
        check(0.0 < self.gamma <= 1.0, f"--gamma must be in (0, 1], got {self.gamma}")
        check(self.decay_period >= 1, f"--decay_period must be at least 1, got {self.decay_period}")
        check(self.image_size >= 8, f"--image_size must be at least 8, got {self.image_size}")
        check(self.init_channels % 2 == 0, f"--init_channels must be even for ImageNet (the stem halves it), "
                                           f"got {self.init_channels}")
        # --data is checked when the run starts (a run on Python Datasets needs none).


CONFIGS: dict[str, type[TrainConfig]] = {"cifar10": CifarTrainConfig, "imagenet": ImageNetTrainConfig}
# Settings that may change when a run is resumed: they do not change what is being trained.
RESUMABLE_OVERRIDES = {"workers", "download", "data", "test_data", "amp", "channels_last", "flip_conv_backward",
                       "deterministic", "eval_batches", "sync_bn"} | RESUMABLE_RUN_OPTIONS
