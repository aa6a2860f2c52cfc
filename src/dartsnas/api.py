"""The Python API's front: build a DARTS network by name, load any trained network dartsnas can test.

``dartsnas.create_model`` and ``dartsnas.load_model`` are the two calls most users need after a
search; ``dartsnas.search.cnn``-style engines (``dartsnas.engine.search_cnn.run`` and the others)
stay the way to run searches and trainings from Python.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .errors import UserError
from .genotype import AnyGenotype, Genotype, RecurrentGenotype, load_genotype
from .settings.choices import NETWORK_DEFAULTS, RNN_NETWORKS

DATASETS = (*NETWORK_DEFAULTS, *RNN_NETWORKS)


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
