"""``dartsnas export``: a trained network as a file other runtimes load.

Convolutional networks are the ones ``dartsnas test cifar10|imagenet`` evaluates (:func:`load_cnn_model`): images in,
plain logits out. A recurrent language model is exported as one step of its recurrence (tokens of one time step and
the hidden state in, the logits and the next hidden state out), the form a runtime loops over to score or generate a
sequence of any length; running the step T times gives the logits of the whole model on T tokens. Both are exported
in evaluation mode on the CPU in float32: no auxiliary head, no drop path, no dropout.

Three formats: ONNX through ``torch.onnx.export``'s ``torch.export``-based exporter (it runs offline and needs the
``onnx`` and ``onnxscript`` packages), TorchScript through ``torch.jit.trace``, and ``torch.export.save`` programs
(``.pt2``). The file is written under a temporary name and renamed when complete, and an existing file is replaced
only when asked, so an interrupted or refused export never leaves a damaged file where a good one was.
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
# The batch a free-batch file is traced with, and the different one it is checked with, so that the check shows the
# batch dimension really is free (a batch of 1 would let the exporters specialise it).
TRACE_BATCH, CHECK_BATCH = 2, 3


class OneStep(torch.nn.Module):
    """One time step of a recurrent language model: ``tokens`` (1, B) and ``hidden`` (B, nhid) -> the step's
    ``logits`` (1, B, ntoken) and the next hidden state."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(tokens, hidden)
        return out.logits, out.hidden


@dataclass
class Exportable:
    """A module and what its exported graph takes: a maker of inputs for a batch, which dimension of each input
    is the batch, and the names of its inputs and outputs."""

    module: torch.nn.Module
    inputs: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]
    batch_dims: tuple[int, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    description: str
    signature: Callable[[int | str], str]  # the inputs and outputs in words, for a batch size or 'N'


@dataclass
class ExportResult:
    path: Path
    format: str
    description: str
    signature: str  # inputs and outputs with their shapes ('N' for a free batch dimension)
    max_difference: float | None  # largest |output difference| against PyTorch, None when not checked
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


def _dynamic_shapes(net: Exportable, dynamic: bool) -> tuple[dict[int, object], ...] | None:
    if not dynamic:
        return None
    batch = torch.export.Dim("batch", min=1)
    return tuple({dim: batch} for dim in net.batch_dims)


def _write_onnx(net: Exportable, example: tuple[torch.Tensor, ...], path: Path, dynamic: bool) -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"ONNX export needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}: "
                        f"pip install {' '.join(missing)} (or use --format torchscript or pt2)")
    # external_data=False: one self-contained file (DARTS networks are far below ONNX's 2 GB limit).
    torch.onnx.export(net.module, example, str(path), dynamo=True, external_data=False,
                      dynamic_shapes=_dynamic_shapes(net, dynamic), input_names=list(net.input_names),
                      output_names=list(net.output_names), verbose=False)


def _write_torchscript(net: Exportable, example: tuple[torch.Tensor, ...], path: Path, dynamic: bool) -> None:
    # Tracing records the operations for these input sizes; the batch dimension stays free either way.
    torch.jit.save(torch.jit.trace(net.module, example), str(path))


def _write_pt2(net: Exportable, example: tuple[torch.Tensor, ...], path: Path, dynamic: bool) -> None:
    torch.export.save(torch.export.export(net.module, example, dynamic_shapes=_dynamic_shapes(net, dynamic)),
                      str(path))


WRITERS: dict[str, Callable[[Exportable, tuple[torch.Tensor, ...], Path, bool], None]] = {
    "onnx": _write_onnx, "torchscript": _write_torchscript, "pt2": _write_pt2,
}


def run_exported(path: str | os.PathLike[str], fmt: str, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The outputs an exported file gives for ``inputs``, run by the runtime of its format."""
    with _quiet():
        if fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feed = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs, strict=True)}
            return tuple(torch.from_numpy(y) for y in session.run(None, feed))
        module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
        with torch.no_grad():
            out = module(*inputs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _check(net: Exportable, path: Path, fmt: str, inputs: tuple[torch.Tensor, ...]) -> tuple[float | None, str]:
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        return None, "not checked: onnxruntime is not installed (pip install onnxruntime)"
    with torch.no_grad():
        expected = net.module(*inputs)
    expected = tuple(expected) if isinstance(expected, tuple) else (expected,)
    got = run_exported(path, fmt, inputs)
    if [tuple(y.shape) for y in got] != [tuple(y.shape) for y in expected]:
        raise UserError(f"the exported file gives outputs of shapes {[tuple(y.shape) for y in got]}, PyTorch "
                        f"{[tuple(y.shape) for y in expected]}; {path} is not a faithful export")
    runtime = {"onnx": "ONNX Runtime", "torchscript": "torch.jit.load", "pt2": "torch.export.load"}[fmt]
    difference = max(float((a - b).abs().max()) for a, b in zip(got, expected, strict=True))
    return difference, f"{runtime} on a batch of {inputs[0].shape[net.batch_dims[0]]} random inputs"


def _convolutional(source: str | os.PathLike[str], cfg: ExportConfig) -> Exportable:
    net = load_cnn_model(source, arch=cfg.arch)
    stored = net.loaded.config.get("image_size") if net.network == "imagenet" else None
    size = cfg.image_size or (stored if isinstance(stored, int) and stored >= 1 else DEFAULT_IMAGE_SIZE[net.network])
    sizes = net.sizes
    return Exportable(
        net.model.float().cpu().eval(),
        lambda batch, gen: (torch.randn(batch, 3, size, size, generator=gen),),
        (0,), ("images",), ("logits",),
        f"{NETWORK_NAMES[net.network]}, {sizes['layers']} cells, C={sizes['init_channels']}, "
        f"{sizes['num_classes']} classes, architecture {net.arch_name}",
        lambda n: f"images {n}x3x{size}x{size} (float32, normalised as in training) -> logits "
                  f"{n}x{sizes['num_classes']}")


def _recurrent(source: str | os.PathLike[str], cfg: ExportConfig) -> Exportable:
    from .evaluate_rnn import load_rnn_model

    if cfg.image_size is not None:
        raise UserError(f"{source} is a recurrent language model; --image_size applies to convolutional networks")
    model = load_rnn_model(source, cfg.arch).model.float().cpu().eval()
    for cell in model.rnns:
        # Packed products only speed up training's gradients (same weights, same products); the tracers cannot
        # record their custom operation, so the step is exported with the plain ones.
        cell.packed = False
    vocab, units = model.ntoken, model.nhid
    return Exportable(
        OneStep(model),
        lambda batch, gen: (torch.randint(0, vocab, (1, batch), generator=gen),
                            0.1 * torch.randn(batch, units, generator=gen)),
        (1, 0), ("tokens", "hidden"), ("logits", "next_hidden"),
        f"recurrent language model, {units} units, vocabulary {vocab:,} (one time step)",
        lambda n: f"tokens 1x{n} (int64), hidden {n}x{units} (float32, zeros to start) -> logits 1x{n}x{vocab}, "
                  f"next_hidden {n}x{units}")


def export_network(cfg: ExportConfig, source: str | os.PathLike[str]) -> ExportResult:
    """Write the network of ``source`` (weights or a training run directory) in ``cfg.format``."""
    cfg.validate()
    from ..api import is_recurrent

    if not Path(source).exists():
        raise UserError(f"{source} does not exist; pass a training run directory or a weights file")
    fmt = cfg.format
    assert fmt is not None
    out = Path(cfg.out) if cfg.out else default_output(source, fmt)
    if out.exists() and not cfg.force:
        raise UserError(f"{out} already exists; pass --force to overwrite it or --out FILE to write elsewhere")
    if not out.parent.is_dir():
        raise UserError(f"the folder of {out} does not exist; create it or pass another --out FILE")
    net = (_recurrent if is_recurrent(Path(source)) else _convolutional)(source, cfg)
    generator = torch.Generator().manual_seed(0)
    example = net.inputs(cfg.batch or TRACE_BATCH, generator)
    partial = out.with_name(f".partial-{out.name}")  # keeps the suffix, which torch.export.save checks
    try:
        with _quiet(), torch.no_grad():
            WRITERS[fmt](net, example, partial, cfg.batch is None)
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
        difference, note = _check(net, out, fmt, net.inputs(cfg.batch or CHECK_BATCH, generator))
    return ExportResult(out, fmt, net.description, net.signature(cfg.batch or "N"), difference, note)
