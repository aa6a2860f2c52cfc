"""``dartsnas export``: a trained convolutional network as a file other runtimes load.

The network is the one ``dartsnas test cifar10|imagenet`` evaluates (:func:`load_cnn_model`), in
evaluation mode on the CPU in float32, so the exported graph returns the same plain logits: no
auxiliary head, no drop path. Three formats: ONNX through ``torch.onnx.export``'s ``torch.export``-based
exporter (it runs offline and needs the ``onnx`` and ``onnxscript`` packages), TorchScript through
``torch.jit.trace``, and ``torch.export.save`` programs (``.pt2``). The file is written under a temporary
name and renamed when complete, and an existing file is replaced only when asked, so an interrupted or
refused export never leaves a damaged file where a good one was.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..settings.export import EXPORT_FORMATS, ExportConfig
from .evaluate_cnn import NETWORK_NAMES, load_cnn_model

logger = logging.getLogger("dartsnas")

DEFAULT_IMAGE_SIZE = {"cifar10": 32, "imagenet": 224}
# The batch a dynamic-batch file is traced with, and the different one it is checked with, so that the
# check shows the batch dimension really is free (a batch of 1 would let the exporters specialise it).
TRACE_BATCH, CHECK_BATCH = 2, 3


@dataclass
class ExportResult:
    path: Path
    format: str
    network: str  # 'cifar10' or 'imagenet'
    description: str
    input_shape: tuple[int | str, ...]  # 'N' for a free batch dimension
    max_difference: float | None  # largest |logit difference| against PyTorch, None when not checked
    check_note: str  # how the file was checked, or why it was not


def default_output(source: str | os.PathLike[str], fmt: str) -> Path:
    """``RUN_DIR/model<suffix>`` for a run directory, else the weights file with the format's suffix."""
    path = Path(source)
    suffix = EXPORT_FORMATS[fmt]
    if path.is_dir():
        return path / f"model{suffix}"
    return path.with_name(path.name.split(".")[0] + suffix)


def _quiet() -> contextlib.ExitStack:
    """The exporters' progress prints and deprecation warnings: noise for someone exporting a file."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _write_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"ONNX export needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}: "
                        f"pip install {' '.join(missing)} (or use --format torchscript or pt2)")
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    # external_data=False: one self-contained file (DARTS networks are far below ONNX's 2 GB limit).
    torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False, dynamic_shapes=shapes,
                      input_names=["images"], output_names=["logits"], verbose=False)


def _write_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    # Tracing records the operations for this image size; the batch dimension stays free either way.
    torch.jit.save(torch.jit.trace(model, example), str(path))


def _write_pt2(model: torch.nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=shapes), str(path))


WRITERS: dict[str, Callable[[torch.nn.Module, torch.Tensor, Path, bool], None]] = {
    "onnx": _write_onnx, "torchscript": _write_torchscript, "pt2": _write_pt2,
}


def run_exported(path: str | os.PathLike[str], fmt: str, images: torch.Tensor) -> torch.Tensor:
    """The logits an exported file gives for ``images``, run by the runtime of its format."""
    with _quiet():
        if fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
        module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
        with torch.no_grad():
            return module(images)


def _check(model: torch.nn.Module, path: Path, fmt: str, images: torch.Tensor) -> tuple[float | None, str]:
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        return None, "not checked: onnxruntime is not installed (pip install onnxruntime)"
    with torch.no_grad():
        expected = model(images)
    got = run_exported(path, fmt, images)
    if got.shape != expected.shape:
        raise UserError(f"the exported file gives logits of shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}"
                        f"; {path} is not a faithful export")
    runtime = {"onnx": "ONNX Runtime", "torchscript": "torch.jit.load", "pt2": "torch.export.load"}[fmt]
    return float((got - expected).abs().max()), f"{runtime} on {images.shape[0]} random images"


def export_network(cfg: ExportConfig, source: str | os.PathLike[str]) -> ExportResult:
    """Write the network of ``source`` (weights or a training run directory) in ``cfg.format``."""
    cfg.validate()
    from ..api import is_recurrent

    if not Path(source).exists():
        raise UserError(f"{source} does not exist; pass a training run directory or a weights file")
    if is_recurrent(Path(source)):
        raise UserError(f"{source} is a recurrent language model; dartsnas export writes the convolutional "
                        f"CIFAR-10 and ImageNet networks only (formats: {', '.join(EXPORT_FORMATS)})")
    fmt = cfg.format
    assert fmt is not None
    out = Path(cfg.out) if cfg.out else default_output(source, fmt)
    if out.exists() and not cfg.force:
        raise UserError(f"{out} already exists; pass --force to overwrite it or --out FILE to write elsewhere")
    if not out.parent.is_dir():
        raise UserError(f"the folder of {out} does not exist; create it or pass another --out FILE")
    net = load_cnn_model(source, arch=cfg.arch)
    model = net.model.float().cpu().eval()
    stored = net.loaded.config.get("image_size") if net.network == "imagenet" else None
    size = cfg.image_size or (stored if isinstance(stored, int) and stored >= 1 else DEFAULT_IMAGE_SIZE[net.network])
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(cfg.batch or TRACE_BATCH, 3, size, size, generator=generator)
    partial = out.with_name(f".partial-{out.name}")  # keeps the suffix, which torch.export.save checks
    try:
        with _quiet(), torch.no_grad():
            WRITERS[fmt](model, example, partial, cfg.batch is None)
        os.replace(partial, out)
    except UserError:
        raise
    except Exception as exc:  # the exporters raise many kinds: one line here, the details in the log
        logger.debug("%s export failed", fmt, exc_info=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{fmt} export of {source} failed: {type(exc).__name__}: {first}") from None
    finally:
        partial.unlink(missing_ok=True)
    difference, note = None, "not checked (--no-verify)"
    if cfg.verify:
        images = torch.randn(cfg.batch or CHECK_BATCH, 3, size, size, generator=generator)
        difference, note = _check(model, out, fmt, images)
    sizes = net.sizes
    description = (f"{NETWORK_NAMES[net.network]}, {sizes['layers']} cells, C={sizes['init_channels']}, "
                   f"{sizes['num_classes']} classes, architecture {net.arch_name}")
    shape = (cfg.batch or "N", 3, size, size)
    return ExportResult(out, fmt, net.network, description, shape, difference, note)
