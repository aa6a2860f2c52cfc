"""Loading the authors' whole pickled module without executing it, and refusing hostile pickles."""

from __future__ import annotations

import collections
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from dartsnas.cli import main
from dartsnas.data.text import Corpus
from dartsnas.engine.evaluate_rnn import load_rnn_model
from dartsnas.errors import UserError
from dartsnas.genotype import get_genotype
from dartsnas.models.rnn import RNNModel

DARTS = get_genotype("DARTS", kind="rnn")


def _authors_modules(monkeypatch) -> types.SimpleNamespace:
    """Classes named like the authors' (model.RNNModel, model.DARTSCell, utils.LockedDropout,
    genotypes.Genotype), registered as importable modules only for pickling."""
    mods = {name: types.ModuleType(name) for name in ("model", "utils", "genotypes")}
    Genotype = collections.namedtuple("Genotype", "recurrent concat")
    Genotype.__module__ = "genotypes"

    class LockedDropout(nn.Module):
        pass

    class DARTSCell(nn.Module):
        def __init__(self, ninp, nhid, dropouth, dropoutx, genotype):
            super().__init__()
            self.nhid, self.dropouth, self.dropoutx, self.genotype = nhid, dropouth, dropoutx, genotype
            self._W0 = nn.Parameter(torch.empty(ninp + nhid, 2 * nhid))
            self._Ws = nn.ParameterList([nn.Parameter(torch.empty(nhid, 2 * nhid)) for _ in genotype.recurrent])

    class AuthorsRNNModel(nn.Module):
        def __init__(self, ntoken, ninp, genotype):
            super().__init__()
            self.lockdrop = LockedDropout()
            self.encoder = nn.Embedding(ntoken, ninp)
            self.rnns = nn.ModuleList([DARTSCell(ninp, ninp, 0.15, 0.7, genotype)])
            self.decoder = nn.Linear(ninp, ntoken)
            self.decoder.weight = self.encoder.weight
            self.ninp = self.nhid = self.nhidlast = ninp
            self.dropout, self.dropouti, self.dropoute, self.ntoken = 0.6, 0.3, 0.05, ntoken
            self.cell_cls = DARTSCell

    for cls, mod, name in ((LockedDropout, "utils", "LockedDropout"), (DARTSCell, "model", "DARTSCell"),
                           (AuthorsRNNModel, "model", "RNNModel"), (Genotype, "genotypes", "Genotype")):
        cls.__module__, cls.__qualname__, cls.__name__ = mod, name, name
        setattr(mods[mod], name, cls)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return types.SimpleNamespace(Genotype=Genotype, RNNModel=AuthorsRNNModel)


def _authors_model(ns, ours: RNNModel):
    genotype = ns.Genotype(recurrent=list(DARTS.recurrent), concat=range(1, 9))
    theirs = ns.RNNModel(ours.ntoken, ours.ninp, genotype)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(ours.state_dict()[name])
    return theirs


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_whole_pickled_module_loads_without_its_classes(monkeypatch, tmp_path: Path, zip_format: bool):
    torch.manual_seed(0)
    ours = RNNModel(21, 6, 6, genotype=DARTS)
    ns = _authors_modules(monkeypatch)
    path = tmp_path / "ptb_model.pt"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(_authors_model(ns, ours), path, _use_new_zipfile_serialization=zip_format)
    monkeypatch.undo()  # the authors' classes are gone: loading must not need (or import) them
    assert "model" not in sys.modules
    loaded = load_rnn_model(path)
    assert loaded.source == "pickled-module" and loaded.vocab is None
    assert loaded.genotype == DARTS
    m = loaded.model
    assert (m.dropout, m.dropouti, m.dropoute) == (0.6, 0.3, 0.05)
    assert (m.rnns[0].dropouth, m.rnns[0].dropoutx) == (0.15, 0.7)
    assert m.decoder.weight is m.encoder.weight
    ours.eval(), m.eval()
    x = torch.randint(0, 21, (7, 2))
    torch.testing.assert_close(m(x, m.init_hidden(2)).logits, ours(x, ours.init_hidden(2)).logits)


def test_test_command_reports_perplexities_of_the_authors_file(monkeypatch, tmp_path: Path, tiny_corpus: Path, capsys):
    torch.manual_seed(0)
    ours = RNNModel(len(Corpus(tiny_corpus)), 6, 6, genotype=DARTS)
    ns = _authors_modules(monkeypatch)
    path = tmp_path / "ptb_model.pt"
    torch.save(_authors_model(ns, ours), path)
    monkeypatch.undo()
    assert main(["test", "ptb", "--model-path", str(path), "--data", str(tiny_corpus), "--bptt", "7"]) == 0
    out = capsys.readouterr().out
    assert "valid ppl" in out and "test ppl" in out
    # A corpus of another size cannot line up with the embedding rows.
    (tiny_corpus / "test.txt").write_text("brand new words\n")
    assert main(["test", "ptb", "--model-path", str(path), "--data", str(tiny_corpus)]) == 2
    assert "word types but the model has" in capsys.readouterr().err


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickles_are_refused_and_never_run(tmp_path: Path, monkeypatch):
    marker = tmp_path / "pwned"
    plain = tmp_path / "evil.pt"
    torch.save({"model": _Evil(marker)}, plain)
    with pytest.raises(UserError, match=r"refusing to load .*system"):
        load_rnn_model(plain)
    # Hidden inside an otherwise well-formed pickled model.
    torch.manual_seed(0)
    ns = _authors_modules(monkeypatch)
    theirs = _authors_model(ns, RNNModel(21, 6, 6, genotype=DARTS))
    theirs.rnns[0].extra = _Evil(marker)
    nested = tmp_path / "evil_model.pt"
    torch.save(theirs, nested)
    monkeypatch.undo()
    with pytest.raises(UserError, match="refusing to load"):
        load_rnn_model(nested)
    assert main(["test", "ptb", "--model-path", str(nested)]) == 2
    assert not marker.exists()


def test_missing_and_foreign_files_are_user_errors(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        load_rnn_model(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load"):
        load_rnn_model(junk)
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a recurrent model"):
        load_rnn_model(tmp_path / "other.pt")
