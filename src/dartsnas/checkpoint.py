"""Every file a run writes or reads that holds tensors, and how it is read without executing pickled code.

Two kinds of files:

* Resumable checkpoints (``checkpoints/last.pt``): a dict of tensors and plain values written by
  :func:`save_checkpoint` and read by :func:`load_checkpoint`, which checks the command and format.
* Trained weights: :func:`save_weights` writes ``best``/``final`` ``.safetensors``; :func:`load_weights`
  reads those and the older or foreign formats below.

Accepted weight files (``load_weights``):

* ``*.safetensors`` written by ``dartsnas train`` (``best``/``final``): tensors plus metadata
  ``format_version``, ``model`` ('cifar10', 'imagenet', 'ptb' or 'wt2'), ``genotype`` and ``config``
  as JSON (recurrent models also ``model_args`` and ``vocab``); tensors that share storage (the
  language model's tied decoder) are stored once and named in ``tied``.
* ``checkpoints/last.pt`` of a training run: a dict with ``format_version``, ``model`` and ``config``.
* The authors' released files: ``cifar10_model.pt`` (a plain state_dict) and ``imagenet_model.pt``
  (``{'state_dict': ...}``, keys possibly prefixed ``module.`` by ``nn.DataParallel``). They were
  written by PyTorch 0.3 and lack the BatchNorm ``num_batches_tracked`` buffers.

Every ``.pt`` file is read with ``torch.load(weights_only=True)``, which only rebuilds tensors and
plain containers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .genotype import AnyGenotype
from .genotype import from_dict as genotype_from_dict
from .rundir import atomic_write

SAFETENSORS_FORMAT = "1"
# Version of the resumable checkpoint dicts (``checkpoints/last.pt``).
FORMAT_VERSION = 1
# Prefixes added by wrappers: nn.DataParallel / DistributedDataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadedWeights:
    """A state_dict and whatever the file says about the network it belongs to."""

    state_dict: dict[str, torch.Tensor]
    source: str  # 'safetensors', 'run-checkpoint', 'state_dict' or 'wrapped-state_dict'
    genotype: AnyGenotype | None = None
    config: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # 'cifar10', 'imagenet', 'ptb' or 'wt2' when the file says so
    meta: dict[str, str] = field(default_factory=dict)  # a safetensors file's metadata as written


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def _tensors_only(state: Mapping[str, Any], path: str) -> dict[str, torch.Tensor]:
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None or not state:
        raise UserError(f"{path} does not hold a network's weights (a dict of tensors); "
                        f"expected a dartsnas checkpoint or the authors' released model file")
    return _strip_prefixes(state)  # type: ignore[arg-type]


def load_weights(path: str | os.PathLike[str]) -> LoadedWeights:
    """Read weights (and, for our own files, the genotype and config) from ``path``; weights that hold
    a NaN or an infinity are refused (their accuracy would be meaningless)."""
    loaded = _read_weights(path)
    check_finite_weights(loaded.state_dict, loaded.source if os.path.isdir(str(path)) else str(path))
    return loaded


def check_finite_weights(state: Mapping[str, torch.Tensor], what: str) -> None:
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise UserError(f"{what} holds non-finite weights ({bad} has NaN or infinite entries); it cannot be "
                        f"evaluated: use an earlier checkpoint of the run")


def _settings_of(config: Any, path: str) -> dict[str, Any]:
    """A weights file's stored training settings: a mapping, or nothing."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UserError(f"{path} has damaged metadata (its settings are a {type(config).__name__}, not a mapping); "
                        f"pass --arch and the network size explicitly")
    return config


def _read_weights(path: str | os.PathLike[str]) -> LoadedWeights:
    path = str(path)
    if os.path.isdir(path):
        for name in ("final.safetensors", "best.safetensors", os.path.join("checkpoints", "last.pt")):
            if os.path.isfile(os.path.join(path, name)):
                return _read_weights(os.path.join(path, name))
        raise UserError(f"{path} holds no final.safetensors, best.safetensors or checkpoints/last.pt; "
                        f"pass a weights file with --model_path")
    if not os.path.isfile(path):
        raise UserError(f"model file {path} does not exist")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- corrupt file, or a pickle that needs code to run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {path} as weights ({first}); only tensors are loaded, never pickled code")
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    verify_checksum(obj, path)
    if "format_version" in obj and isinstance(obj.get("model"), dict):
        genotype = obj.get("genotype")
        # A run's data record (classes, normalisation), as the safetensors files carry it in their metadata.
        meta = {"data": json.dumps(obj["data"])} if isinstance(obj.get("data"), dict) else {}
        return LoadedWeights(_tensors_only(obj["model"], path), "run-checkpoint",
                             genotype_from_dict(genotype) if isinstance(genotype, dict) else None,
                             _settings_of(obj.get("config"), path), obj.get("network"), meta)
    if isinstance(obj.get("state_dict"), dict):
        return LoadedWeights(_tensors_only(obj["state_dict"], path), "wrapped-state_dict")
    return LoadedWeights(_tensors_only(obj, path), "state_dict")


def _load_safetensors(path: str) -> LoadedWeights:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} as safetensors ({exc})") from None
    genotype = None
    config: dict[str, Any] = {}
    try:
        if meta.get("genotype"):
            genotype = genotype_from_dict(json.loads(meta["genotype"]))
        if meta.get("config"):
            config = json.loads(meta["config"])
        tied = json.loads(meta.get("tied") or "{}")
    except (ValueError, RecursionError):  # bad JSON, huge integers, absurd nesting
        raise UserError(f"{path} has unreadable metadata; pass --arch and the network size explicitly") from None
    config = _settings_of(config, path)
    if "sha256" in meta and meta["sha256"] != digest(state):
        raise UserError(f"{path} is damaged: its tensors do not match the checksum written with them")
    for name, source in tied.items() if isinstance(tied, dict) else ():
        if source in state:
            state[name] = state[source]
    return LoadedWeights(_strip_prefixes(state), "safetensors", genotype, config, meta.get("model"), dict(meta))


def save_weights(path: str | os.PathLike[str], model: nn.Module | Mapping[str, torch.Tensor], network: str,
                 genotype: AnyGenotype, config: Mapping[str, Any], extra: Mapping[str, str] | None = None) -> None:
    """Write a network's weights (a module or its state_dict) as safetensors, with what is needed to
    rebuild it as metadata."""
    from safetensors.torch import save

    source = model.state_dict() if isinstance(model, nn.Module) else model
    state: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, value in source.items():
        # safetensors stores no aliases: a tensor that is another one (a tied weight) is named instead.
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        state[key] = value.detach().to("cpu").contiguous()
    meta = {"format_version": SAFETENSORS_FORMAT, "model": network, "genotype": json.dumps(genotype.to_dict()),
            "config": json.dumps(dict(config))}
    if tied:
        meta["tied"] = json.dumps(tied)
    meta["sha256"] = digest(state)
    meta.update(extra or {})
    blob = save(state, metadata=meta)
    atomic_write(Path(path), lambda f: f.write(blob))


def digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content (tensors by dtype, shape and bytes; keys and plain values by
    their repr), the same however the file was laid out. Files can rot or be cut short on disk, and
    PyTorch's zip reader does not check its CRCs, so this is what tells a damaged file from a good one."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    feed(obj)
    return h.hexdigest()


def verify_checksum(state: Any, path: str | os.PathLike[str]) -> None:
    """Check a stored digest (files written before digests existed have none)."""
    if isinstance(state, dict) and "checksum" in state:
        stored = state.pop("checksum")
        if stored != digest(state):
            raise UserError(f"{path} is damaged: its content does not match the checksum written with it; resume "
                            f"from a copy or start a new run")


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a resumable checkpoint atomically (an interrupted save leaves the previous one intact),
    with the digest of its content, which :func:`load_checkpoint` verifies."""
    state = {**state, "checksum": digest(state)}
    atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike[str], kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no pickled code runs).

    With ``kind``, insist on a resumable checkpoint of that command and of this format version.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- corrupt file, foreign pickle, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load checkpoint {path}: {first}") from None
    verify_checksum(state, path)
    if kind is not None and (not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION
                             or state.get("kind") != kind):
        raise UserError(f"{path} is not a {kind} checkpoint of this version")
    return state


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "the checkpoint",
              fix: str | None = None) -> None:
    """Strictly load ``state`` into ``model``, or raise a one-line error naming the first mismatch and
    ``fix`` (by default: which flags decide a trained network's shape).

    BatchNorm ``num_batches_tracked`` buffers may be absent (files written before PyTorch 0.4);
    the model keeps its own values for them (they only matter with ``momentum=None``).
    """
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise UserError(f"{what} does not match the network: it has {key} ({_shape(value)}), which the network "
                            f"lacks; {fix or 'check --arch, --layers, --init_channels and --auxiliary'}")
        if own[key].shape != value.shape:
            raise UserError(f"{what} does not match the network: {key} is {_shape(value)} there but "
                            f"{_shape(own[key])} here; {fix or 'check --arch, --layers and --init_channels'}")
    for key, value in own.items():
        if key not in state and not key.endswith("num_batches_tracked"):
            raise UserError(f"{what} does not match the network: it lacks {key} ({_shape(value)}); "
                            f"{fix or 'check --arch, --layers, --init_channels and --auxiliary'}")
    full = dict(own)
    full.update(state)
    model.load_state_dict(full, strict=True)
