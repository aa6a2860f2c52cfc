"""The Python API's front: search a cell and train a network (on a named data set, a folder or your own
``torch.utils.data.Dataset``), build a DARTS network by name, load any trained network dartsnas can test.

``dartsnas.search`` and ``dartsnas.train`` take the command's settings as keywords and call the same
engines as the command line (``dartsnas.engine.search_cnn.run``, ``dartsnas.engine.train_cnn.run``).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from .engine.search_job import SearchResult
    from .engine.train_cnn import TrainResult

from .errors import UserError
from .genotype import AnyGenotype, Genotype, RecurrentGenotype, load_genotype
from .settings.choices import NETWORK_DEFAULTS, RNN_NETWORKS

DATASETS = (*NETWORK_DEFAULTS, *RNN_NETWORKS)

OnEpochEnd = Callable[[int, dict[str, Any]], None]


def _config(cls: type, engine: Any, settings: dict[str, Any], resume: str | os.PathLike[str] | None) -> Any:
    """The settings of a new run (defaults and ``settings``) or of a resumed one (its stored settings
    with the ``settings`` that may change); unknown names are one line with the nearest known one."""
    from .config import field_names, make_config

    names = field_names(cls)
    for key in settings:
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            raise UserError(f"unknown setting {key!r}{f'; did you mean {close[0]!r}?' if close else ''} (the "
                            f"settings are the command's flags: {cls.__name__})")
    if isinstance(settings.get("arch"), Genotype):
        settings = {**settings, "arch": str(settings["arch"])}  # stored in config.yaml in its printed form
    if resume is not None:
        return engine.resume_config(resume, settings)
    return make_config(cls, **settings)


def search(train_data: Dataset | None = None, valid_data: Dataset | None = None, *,
           resume: str | os.PathLike[str] | None = None, num_classes: int | None = None,
           on_epoch_end: OnEpochEnd | None = None, **settings: Any) -> SearchResult:
    """Search a convolutional cell; returns the run directory, the final genotype and each epoch's metrics.

    ``settings`` are ``dartsnas search cnn``'s flags (``epochs=10, layers=5, dataset="folder",
    data="images/"``...). ``train_data``: a Dataset of ``(float image C x H x W, label)`` items searched
    on instead, split by ``train_portion`` unless ``valid_data`` trains the architecture; ``num_classes``
    when it has no ``classes`` or ``targets``. ``resume``: a run directory to continue (a run started on
    a Dataset needs the same Dataset again).
    """
    from .engine import search_cnn as engine

    cfg = _config(engine.SearchConfig, engine, settings, resume)
    return engine.run(cfg, resume=resume, on_epoch_end=on_epoch_end, train_data=train_data, valid_data=valid_data,
                      num_classes=num_classes)


def train(arch: str | Genotype | os.PathLike[str] | None = None, train_data: Dataset | None = None,
          valid_data: Dataset | None = None, test_data: Dataset | None = None, *, network: str = "cifar10",
          resume: str | os.PathLike[str] | None = None, num_classes: int | None = None,
          on_epoch_end: OnEpochEnd | None = None, **settings: Any) -> TrainResult:
    """Train the network of ``arch`` (a name, Genotype, genotype.json, search run directory or printed
    genotype; default DARTS) from scratch; returns the run directory, genotype, metrics and test result.

    ``network``: ``cifar10`` (the CIFAR-sized network, for small images) or ``imagenet``; ``settings``
    are ``dartsnas train <network>``'s flags (``epochs=20, layers=8, dataset="folder", data="images/"``...).
    ``train_data``/``valid_data``/``test_data``: Datasets of ``(float image C x H x W, label)`` items
    used instead: trained on, evaluated each epoch (choosing ``best.safetensors``), and evaluated
    once at the end.
    """
    from .engine import train_cnn as engine

    if network not in engine.CONFIGS:
        raise UserError(f"unknown network {network!r}; choose one of {', '.join(engine.CONFIGS)}")
    if arch is not None:
        settings = {**settings, "arch": arch if isinstance(arch, (str, Genotype)) else os.fspath(arch)}
    cfg = _config(engine.CONFIGS[network], engine, settings, resume)
    return engine.run(cfg, resume=resume, on_epoch_end=on_epoch_end, train_data=train_data, valid_data=valid_data,
                      test_data=test_data, num_classes=num_classes)


def create_model(arch: str | AnyGenotype = "DARTS_V2", dataset: str = "cifar10", *, num_classes: int | None = None,
                 init_channels: int | None = None, layers: int | None = None, auxiliary: bool = False,
                 units: int | None = None, vocab: int | None = None) -> nn.Module:
    """A freshly initialised evaluation network for ``arch`` (a name, genotype, genotype.json, search run
    directory or printed ``Genotype(...)``), at the paper's size for ``dataset`` unless told otherwise.

    ``cifar10``/``imagenet``: the convolutional networks (paper appendix A.2.1 and A.2.3; ``model(x)``
    gives logits, ``model(x, aux=True)`` also the auxiliary head's in training). ``ptb``/``wt2``: the
    recurrent language model (appendix A.2.2 and A.2.4), ``units`` wide over a ``vocab``-word vocabulary.
    """
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if dataset in RNN_NETWORKS:
        from .models.rnn import RNNModel

        genotype = load_genotype(arch, kind="rnn")
        assert isinstance(genotype, RecurrentGenotype)
        default_units, default_vocab = RNN_NETWORKS[dataset]
        size = units or default_units
        return RNNModel(vocab or default_vocab, size, size, size, genotype=genotype)
    from .models.cnn import build_network

    genotype = load_genotype(arch, kind="cnn")
    assert isinstance(genotype, Genotype)
    defaults = NETWORK_DEFAULTS[dataset]
    return build_network(dataset, genotype, init_channels or defaults["init_channels"], layers or defaults["layers"],
                         auxiliary, num_classes or defaults["num_classes"])


def load_model(path: str | os.PathLike[str], arch: str | None = None) -> nn.Module:
    """Any trained network ``dartsnas test`` reads, built and loaded, in eval mode: a training run
    directory, its ``final``/``best`` ``.safetensors`` or ``checkpoints/last.pt``, or the authors'
    released ``cifar10_model.pt``, ``imagenet_model.pt`` and ``ptb_model.pt``. ``arch`` names the
    architecture where the file does not (the authors' CNN files)."""
    if is_recurrent(Path(path)):
        from .engine.evaluate_rnn import load_rnn_model

        return load_rnn_model(path, arch).model.eval()
    from .engine.evaluate_cnn import load_cnn_model

    return load_cnn_model(path, arch=arch).model.eval()


def is_recurrent(path: Path) -> bool:
    """Whether ``path`` holds a language model: by its metadata or kind where it has them, else by its
    tensors (an embedding matrix), else by the authors' file name."""
    from .checkpoint import load_weights

    if path.is_dir():
        config = path / "config.yaml"
        if config.is_file():
            return "command: train-rnn" in config.read_text(encoding="utf-8", errors="replace")
        return False
    if path.suffix == ".safetensors":
        # The header alone says: the weights themselves are read once, by the loader that builds the model.
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get("model") in RNN_NETWORKS
        except (SafetensorError, OSError):
            return False  # the loader reports what is wrong with the file
    try:
        return "encoder.weight" in load_weights(path).state_dict
    except UserError:
        return True  # not a tensor file: only the authors' whole pickled language model is accepted
