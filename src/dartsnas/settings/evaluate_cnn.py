"""Settings of ``dartsnas test cifar10|imagenet`` and ``dartsnas info``."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check, option
from .choices import AMP_CHOICES, NETWORK_DEFAULTS, RNN_NETWORKS
from .runtime import RuntimeOptions


@dataclass
class TestConfig(RuntimeOptions):
    """Settings of ``dartsnas test cifar10|imagenet``."""

    __test__ = False  # not a pytest test class, despite the name

    model_path: str | None = option(None, "weights to evaluate: final.safetensors/best.safetensors of a run, a run "
                                          "directory, its checkpoints/last.pt, or the authors' cifar10_model.pt / "
                                          "imagenet_model.pt", group="network")
    arch: str | None = option(None, "architecture (default: from the weights' metadata, else DARTS): a name, "
                                    "genotype.json, search run directory or printed Genotype(...)", group="network")
    data: str | None = option(None, "images to evaluate: a CIFAR-10 .npz file (its x_test/y_test arrays if it has "
                                    "them, else x/y), a CIFAR-10 folder (its test batch) or an ImageNet folder "
                                    "(its val/); default: the test images of the training run the weights name",
                              group="data")
    test_data: str | None = option(None, "CIFAR-10 only: the same as --data FILE.npz", group="data")
    init_channels: int | None = option(None, "initial channels C (default: read off the weights)", group="network")
    layers: int | None = option(None, "number of cells (default: read off the weights)", group="network")
    auxiliary: bool | None = option(None, "whether the weights include the auxiliary head (default: read off "
                                          "the weights; the head is never used for testing)", group="network")
    batch_size: int | None = option(None, "evaluation batch size (default: the training run's, else 96 for "
                                          "CIFAR-10 and 128 for ImageNet)", group="evaluation")
    image_size: int | None = option(None, "ImageNet only: crop size (default: the training run's, else 224)",
                                    group="evaluation")
    eval_batches: int | None = option(None, "evaluate only this many batches (a quick check; default: all)",
                                      group="evaluation")
    workers: int = option(4, "ImageNet only: data-loading worker processes", group="runtime")
    amp: str = option("auto", "mixed precision on CUDA: auto (bf16 where supported, else fp16), bf16, fp16 or off; "
                              "always float32 on the CPU", group="speed", choices=AMP_CHOICES)
    channels_last: str = option("auto", "channels-last memory format: auto (CPU, or CUDA with mixed precision), "
                                        "on or off", group="speed", choices=("auto", "on", "off"))
    download: bool = option(True, "download CIFAR-10 when no --data is given and it is missing", group="data")

    def validate(self) -> None:
        check(bool(self.model_path), "pass the weights to evaluate with --model_path FILE")
        for name in ("init_channels", "layers", "batch_size", "image_size", "eval_batches"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"--{name} must be at least 1, got {value}")
        super().validate()


@dataclass
class InfoConfig:
    """Settings of ``dartsnas info``: sizes only, nothing runs, so no runtime options."""

    dataset: str = option("cifar10", "which evaluation network", group="network",
                          choices=tuple(NETWORK_DEFAULTS) + tuple(RNN_NETWORKS))
    init_channels: int | None = option(None, "initial channels C (default: 36 for CIFAR-10, 48 for ImageNet)",
                                       group="network")
    layers: int | None = option(None, "number of cells (default: 20 for CIFAR-10, 14 for ImageNet)", group="network")
    num_classes: int | None = option(None, "number of classes (default: 10 / 1000)", group="network")
    image_size: int | None = option(None, "input size for the multiply-adds (default: 32 / 224)", group="network")
    units: int | None = option(None, "recurrent networks: embedding and hidden units (default: 850 PTB, 700 WT2)",
                               group="network")
    vocab: int | None = option(None, "recurrent networks: vocabulary size (default: 10,000 PTB, 33,278 WT2)",
                               group="network")
