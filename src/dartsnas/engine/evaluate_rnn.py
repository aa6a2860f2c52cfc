"""``dartsnas test ptb`` / ``test wt2``: validation and test perplexity of a trained recurrent model.

A model file is either one of ours (``best.safetensors`` or ``final.safetensors`` of ``dartsnas
train ptb|wt2``, whose metadata holds the genotype, the model's sizes and the vocabulary; older runs'
``checkpoints/best.pt``, or ``last.pt``, plain dicts of tensors loaded with ``weights_only=True``) or
the authors' released ``ptb_model.pt``, which is a whole pickled module (their rnn/test.py reads it with ``torch.load``). The latter is
read by a restricted unpickler that only knows the handful of classes such a file names (the authors'
``model.RNNModel``, ``model.DARTSCell``, ``utils.LockedDropout``, ``genotypes.Genotype``, the
PyTorch containers and tensor rebuild functions). Modules come back as inert placeholders from
which the tensors and the genotype are copied into a fresh :class:`RNNModel`; nothing in the file
is ever executed, and a file that names anything else (``os.system``, ``builtins.eval``, ...) is
refused.
"""

from __future__ import annotations

import collections
import json
import math
import pickle
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import distributed
from ..checkpoint import check_finite_weights, load_into, load_weights, verify_checksum
from ..data.text import Corpus, batchify, get_batch
from ..errors import UserError
from ..genotype import RecurrentGenotype, load_genotype
from ..genotype import from_dict as genotype_from_dict
from ..models.rnn import RNNModel, count_parameters
from ..settings.evaluate_rnn import TestConfig
from ..utils import resolve_device

CHECKPOINT_KIND = "rnn-model"


# -- perplexity ---------------------------------------------------------------------------------


def evaluate(model: torch.nn.Module, source: torch.Tensor, bptt: int, max_batches: int | None = None) -> float:
    """Mean per-token cross-entropy over ``source`` (rows x batch), the hidden state carried along.

    Every target token counts once, including the shorter last chunk, so ``exp`` of the result is
    the split's perplexity.
    """
    was_training = model.training
    model.eval()
    hidden = model.init_hidden(source.shape[1])
    total = torch.zeros((), dtype=torch.float64, device=source.device)
    count = 0
    with torch.no_grad():
        for n, i in enumerate(range(0, source.shape[0] - 1, bptt)):
            if max_batches is not None and n >= max_batches:
                break
            data, targets = get_batch(source, i, bptt)
            out = model(data, hidden)
            hidden = out.hidden
            total += F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), targets.reshape(-1),
                                     reduction="sum").double()
            count += targets.numel()
    model.train(was_training)
    return float(total) / max(count, 1)


def evaluate_sharded(model: torch.nn.Module, source: torch.Tensor, bptt: int, max_batches: int | None = None
                     ) -> float:
    """:func:`evaluate` with the columns of ``source`` (independent streams) shared out over the
    data-parallel processes; every process gets the loss one process computes (up to rounding)."""
    if not distributed.is_distributed():
        return evaluate(model, source, bptt, max_batches)
    lo, hi = distributed.shard_bounds(source.shape[1])
    target_rows = source.shape[0] - 1 if max_batches is None else min(source.shape[0] - 1, max_batches * bptt)
    count = target_rows * (hi - lo)
    loss = evaluate(model, source[:, lo:hi].contiguous(), bptt, max_batches) if hi > lo else 0.0
    total, count = distributed.all_reduce_sum([loss * count, count])
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


# -- restricted unpickling of the authors' whole-module files -------------------------------------


class RefusedPickle(pickle.UnpicklingError):
    """The file asks for something a model checkpoint never needs."""


class PickledModule:
    """Inert stand-in for a pickled ``nn.Module``: it only keeps the attribute dict."""

    dump_patches = False  # read by torch's legacy loader when it compares class sources
    qualname = "?"

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


class PickledGenotype:
    """Stand-in for the authors' ``genotypes.Genotype`` namedtuple: keeps its fields."""

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledGenotype:  # noqa: PYI034
        obj = object.__new__(cls)
        obj.fields = dict(zip(("recurrent", "concat"), args), **kwargs)
        return obj

    def __setstate__(self, state: Any) -> None:
        pass


def _placeholder(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (PickledModule,), {"qualname": qualname})


# The module classes a whole pickled DARTS language model names (old and new PyTorch).
_MODULE_CLASSES = {
    "model.RNNModel", "model.DARTSCell", "utils.LockedDropout", "torch.nn.modules.sparse.Embedding",
    "torch.nn.modules.linear.Linear", "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.ParameterList", "torch.nn.modules.dropout.Dropout",
}
_PLACEHOLDERS = {name: _placeholder(name) for name in _MODULE_CLASSES}


def _no_backend() -> None:
    return None


def _small_range(*args: int) -> range:
    """``range`` as a pickle may call it (a genotype's ``concat=range(1, 9)``), refusing lengths that
    would let a tiny file expand into gigabytes (``frozenset(range(10**9))``)."""
    r = range(*args)
    if len(r) > 10_000:
        raise RefusedPickle(f"range of {len(r):,} elements")
    return r


_SAFE_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.range": _small_range, "__builtin__.set": set,
    "__builtin__.frozenset": frozenset, "__builtin__.xrange": _small_range,
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
    "torch.nn.parameter.Parameter": torch.nn.Parameter,
    "torch.Size": torch.Size,
    # PyTorch 0.3 pickled every module's computation backend; it carries no data.
    "torch.nn.backends.thnn._get_thnn_function_backend": _no_backend,
    "genotypes.Genotype": PickledGenotype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        if qualname in _PLACEHOLDERS:
            return _PLACEHOLDERS[qualname]
        if qualname in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[qualname]
        raise RefusedPickle(qualname)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# Passed to torch.load as its pickle module: torch reads the file container (zip or the pre-1.6
# format of the released models) and the raw tensor data; every object comes from find_class above.
_restricted_pickle = types.ModuleType("dartsnas_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]
_restricted_pickle.__dict__["UnpicklingError"] = pickle.UnpicklingError


def load_pickled_module(path: str | Path) -> PickledModule:
    """Read a whole pickled module (e.g. the authors' ``ptb_model.pt``) without executing it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that the placeholder classes' source differs
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except RefusedPickle as exc:
        raise UserError(f"refusing to load {path}: it asks for {exc.args[0]!r}, which a model file never needs; "
                        f"only tensors and the genotype are read from pickled models") from None
    if not isinstance(obj, PickledModule):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a pickled recurrent model")
    return obj


def _module_state(module: PickledModule, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state_dict of a placeholder module tree (parameters and buffers, by dotted name)."""
    out: dict[str, torch.Tensor] = {}
    for key in ("_parameters", "_buffers"):
        for name, value in (module.state.get(key) or {}).items():
            if isinstance(value, torch.Tensor):
                out[prefix + str(name)] = value.detach()
    for name, child in (module.state.get("_modules") or {}).items():
        if isinstance(child, PickledModule):
            out.update(_module_state(child, f"{prefix}{name}."))
    return out


def _find_genotype(module: PickledModule) -> RecurrentGenotype | None:
    g = module.state.get("genotype")
    if isinstance(g, PickledGenotype):
        fields = {k: list(v) if isinstance(v, (range, tuple, list)) else v for k, v in g.fields.items()}
        return RecurrentGenotype(recurrent=[tuple(e) for e in fields.get("recurrent", [])],
                                 concat=fields.get("concat", []))
    for child in (module.state.get("_modules") or {}).values():
        if isinstance(child, PickledModule):
            found = _find_genotype(child)
            if found is not None:
                return found
    return None


# -- loading any recurrent model file ------------------------------------------------------------


@dataclass
class LoadedRNN:
    model: RNNModel
    genotype: RecurrentGenotype
    vocab: list[str] | None  # None: the authors' file, whose vocabulary is the corpus' original order
    source: str  # 'dartsnas' or 'pickled-module' or 'state_dict'
    config: dict[str, Any]


def _float(state: dict[str, Any], key: str, default: float) -> float:
    value = state.get(key, default)
    return float(value) if isinstance(value, (int, float)) else default


def _build(state_dict: dict[str, torch.Tensor], genotype: RecurrentGenotype, dropouts: dict[str, float],
           path: Any) -> RNNModel:
    try:
        ntoken, ninp = state_dict["encoder.weight"].shape
    except (KeyError, ValueError):
        raise UserError(f"{path} has no encoder.weight matrix; it is not a recurrent language model") from None
    model = RNNModel(int(ntoken), int(ninp), int(ninp), int(ninp), genotype=genotype, packed=True, **dropouts)
    state = dict(state_dict)
    state.setdefault("decoder.weight", state["encoder.weight"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path} does not fit the {genotype} cell at {ninp} units: "
                        f"{str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}") from None
    return model


def load_rnn_model(path: str | Path, arch: str | None = None) -> LoadedRNN:
    """Load our checkpoint, a run directory, a plain state_dict or the authors' pickled model; a model
    with non-finite weights is refused."""
    loaded = _read_rnn_model(path, arch)
    check_finite_weights(loaded.model.state_dict(), str(path))
    return loaded


def _read_rnn_model(path: str | Path, arch: str | None = None) -> LoadedRNN:
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "final.safetensors", "checkpoints/best.pt", "checkpoints/last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise UserError(f"{path} is a directory without best.safetensors; pass a model file or a training run "
                            f"directory")
    if not path.is_file():
        raise UserError(f"model file {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors_rnn(path)
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 -- not a plain tensor file: maybe a whole pickled module
        try:
            module = load_pickled_module(path)
        except UserError:
            raise
        except Exception:  # noqa: BLE001 -- neither format: report the plain loader's reason
            reason = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
            raise UserError(f"cannot load {path}: {reason}") from None
        try:
            return _from_pickled_module(module, arch, path)
        except (TypeError, AttributeError, ValueError, KeyError, IndexError) as exc:
            # Only the authors' layout is understood; a crafted file of allowed pieces in another shape is not.
            raise UserError(f"{path} is not a DARTS language model as the authors' code pickles it "
                            f"({type(exc).__name__})") from None
    verify_checksum(obj, path)
    if isinstance(obj, dict) and obj.get("kind") in (CHECKPOINT_KIND, "train-rnn") and "model" in obj:
        genotype = genotype_from_dict(obj["genotype"])
        if not isinstance(genotype, RecurrentGenotype):
            raise UserError(f"{path} holds a convolutional model; use the CNN commands for it")
        args = obj["model_args"]
        model = RNNModel(genotype=genotype, packed=True, **args)
        model.load_state_dict(obj["model"])
        return LoadedRNN(model, genotype, list(obj["vocab"]), "dartsnas", obj.get("config", {}))
    if isinstance(obj, dict) and "encoder.weight" in obj:
        genotype = load_genotype(arch or "DARTS", kind="rnn")
        return LoadedRNN(_build(obj, genotype, {}, path), genotype, None, "state_dict", {})
    raise UserError(f"{path} is not a recurrent model checkpoint")


def _load_safetensors_rnn(path: Path) -> LoadedRNN:
    loaded = load_weights(path)
    if not isinstance(loaded.genotype, RecurrentGenotype) or "model_args" not in loaded.meta:
        raise UserError(f"{path} does not hold a recurrent language model trained by dartsnas train ptb|wt2")
    try:
        args, vocab = json.loads(loaded.meta["model_args"]), json.loads(loaded.meta.get("vocab") or "null")
    except json.JSONDecodeError:
        raise UserError(f"{path} has unreadable metadata (model_args or vocab)") from None
    model = RNNModel(genotype=loaded.genotype, packed=True, **args)
    load_into(model, loaded.state_dict, str(path))
    return LoadedRNN(model, loaded.genotype, vocab, "dartsnas", loaded.config)


def _from_pickled_module(module: PickledModule, arch: str | None, path: Path) -> LoadedRNN:
    genotype = _find_genotype(module)
    if genotype is None:
        genotype = load_genotype(arch or "DARTS", kind="rnn")
    cell = (module.state.get("_modules") or {}).get("rnns")
    cell0 = (cell.state.get("_modules") or {}).get("0") if isinstance(cell, PickledModule) else None
    cstate = cell0.state if isinstance(cell0, PickledModule) else {}
    dropouts = {
        "dropout": _float(module.state, "dropout", 0.75), "dropouti": _float(module.state, "dropouti", 0.2),
        "dropoute": _float(module.state, "dropoute", 0.1), "dropouth": _float(cstate, "dropouth", 0.25),
        "dropoutx": _float(cstate, "dropoutx", 0.75),
    }
    model = _build(_module_state(module), genotype, dropouts, path)
    return LoadedRNN(model, genotype, None, "pickled-module", {})


def rnn_info(arch: str | RecurrentGenotype = "DARTS", ntoken: int = 10000, emsize: int = 850) -> int:
    """Parameters of the trained language model for ``arch`` (tied weights counted once).

    DARTS_V2 at 850 units on PTB's 10,000 words: 22,960,000 (the paper's 23M, Table 2). Nothing is
    allocated: the model is built on the ``meta`` device.
    """
    genotype = load_genotype(arch, kind="rnn")
    with torch.device("meta"):
        model = RNNModel(ntoken, emsize, emsize, emsize, genotype=genotype)
    return count_parameters(model)


# -- the command ----------------------------------------------------------------------------------


@dataclass
class TestResult:
    valid_loss: float
    test_loss: float
    parameters: int

    @property
    def valid_ppl(self) -> float:
        return perplexity(self.valid_loss)

    @property
    def test_ppl(self) -> float:
        return perplexity(self.test_loss)


def run_test(cfg: TestConfig, default_data: str = "data/penn") -> TestResult:
    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = load_rnn_model(cfg.model_path, cfg.arch)
    data = cfg.data or loaded.config.get("data") or default_data
    corpus = Corpus(data, vocab=loaded.vocab, splits=("valid", "test"))
    if loaded.vocab is None and len(corpus) != loaded.model.ntoken:
        raise UserError(f"the corpus in {data} has {len(corpus)} word types but the model has {loaded.model.ntoken}; "
                        f"evaluate on the corpus the model was trained on")
    model = loaded.model.to(device)
    valid = evaluate(model, batchify(corpus.valid, cfg.eval_batch_size, device), cfg.bptt)
    test = evaluate(model, batchify(corpus.test, cfg.test_batch_size, device), cfg.bptt)
    return TestResult(valid, test, count_parameters(model))
