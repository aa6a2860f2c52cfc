"""Settings of ``dartsnas export``: write a trained network as ONNX, TorchScript or a ``torch.export`` program."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check, option

# Format name -> file suffix of the file written by default.
EXPORT_FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2"}


@dataclass
class ExportConfig:
    """Settings of ``dartsnas export``; the weights come as the command's positional argument."""

    format: str | None = option(None, "file format: onnx (for ONNX Runtime and other runtimes), torchscript "
                                      "(torch.jit.load) or pt2 (torch.export.load)", group="output",
                                choices=tuple(EXPORT_FORMATS))
    out: str | None = option(None, "output file (default: next to the weights: WEIGHTS with the format's suffix, or RUN_DIR/model.onnx, model.torchscript.pt, model.pt2)",
                             group="output")
    force: bool = option(False, "overwrite the output file if it exists", group="output")
    batch: int | None = option(None, "fix the batch dimension to N (default: any batch size; a TorchScript "
                                     "file always takes any)", group="network")
    image_size: int | None = option(None, "convolutional networks: input height and width (default: the training "
                                          "run's, else 32 for CIFAR-10 and 224 for ImageNet)", group="network")
    arch: str | None = option(None, "architecture where the weights name none (the authors' released files): a "
                                    "name, genotype.json, search run directory or printed Genotype(...)",
                              group="network")
    verify: bool = option(True, "load the written file and compare its outputs with PyTorch's on random inputs",
                         group="output")

    def validate(self) -> None:
        check(self.format is not None, f"pass the file format with --format {'|'.join(EXPORT_FORMATS)}")
        for name in ("batch", "image_size"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"--{name} must be at least 1, got {value}")
