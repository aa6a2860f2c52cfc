"""Word-level corpora (Penn Treebank, WikiText-2) as token-id tensors.

The vocabulary is built exactly as in the authors' code (rnn/data.py ``Corpus``): words are numbered in
order of first appearance over ``train.txt``, then ``valid.txt``, then ``test.txt``, and every line
ends with an ``<eos>`` token. The released PTB model's embedding rows follow that order, so any
other order would silently scramble it.

Batching follows the classic language-model layout: ``batchify`` cuts a split into ``bsz``
contiguous streams, one per column, and ``get_batch`` takes ``seq_len`` consecutive rows as input
and the rows one step later as targets::

    tokens a b c d e f g h i j k l   --batchify(bsz=3)-->   a e i
                                                            b f j
                                                            c g k
                                                            d h l
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError

SPLITS = ("train", "valid", "test")
EOS = "<eos>"


@dataclass
class Dictionary:
    """Word <-> id, ids in order of first appearance."""

    idx2word: list[str] = field(default_factory=list)
    word2idx: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_words(cls, words: Sequence[str]) -> Dictionary:
        d = cls(list(words), {w: i for i, w in enumerate(words)})
        if len(d.word2idx) != len(d.idx2word):
            raise UserError("the vocabulary lists a word twice; it cannot come from a dartsnas run")
        return d

    def add(self, word: str) -> int:
        idx = self.word2idx.get(word)
        if idx is None:
            idx = self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return idx

    def __len__(self) -> int:
        return len(self.idx2word)


def _lines(path: Path) -> Iterable[list[str]]:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield line.split() + [EOS]
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start} of a line cannot be decoded); convert it, "
                        f"e.g. iconv -f latin1 -t utf-8") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


class Corpus:
    """The three splits of a word-level corpus folder (``train.txt``, ``valid.txt``, ``test.txt``).

    Args:
        path: the folder.
        vocab: a fixed vocabulary (e.g. the one stored with a trained model). Words outside it are an
            error, because the model has no row for them. Without it the vocabulary is built from
            the three files in the original order.
        splits: which splits to read (all three build the vocabulary when ``vocab`` is None).
    """

    def __init__(self, path: str | os.PathLike[str], vocab: Sequence[str] | None = None,
                 splits: Sequence[str] = SPLITS):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"data folder {self.path} does not exist; pass --data DIR with train.txt, valid.txt "
                            f"and test.txt (e.g. the Penn Treebank folder)")
        files = {s: self.path / f"{s}.txt" for s in SPLITS}
        needed = SPLITS if vocab is None else splits
        missing = [str(files[s]) for s in needed if not files[s].is_file()]
        if missing:
            raise UserError(f"missing corpus file(s): {', '.join(missing)}; a corpus folder holds train.txt, "
                            f"valid.txt and test.txt")
        self.fixed_vocab = vocab is not None
        self.dictionary = Dictionary.from_words(vocab) if vocab is not None else Dictionary()
        self.splits: dict[str, torch.Tensor] = {}
        for s in SPLITS:
            if s in needed:
                self.splits[s] = self._tokenize(files[s])

    def _tokenize(self, path: Path) -> torch.Tensor:
        ids: list[int] = []
        if self.fixed_vocab:
            w2i = self.dictionary.word2idx
            unknown: dict[str, None] = {}
            for words in _lines(path):
                for w in words:
                    idx = w2i.get(w)
                    if idx is None:
                        unknown[w] = None
                    else:
                        ids.append(idx)
            if unknown:
                examples = ", ".join(repr(w) for w in list(unknown)[:5])
                raise UserError(f"{path} has {len(unknown)} word type(s) outside the model's vocabulary of "
                                f"{len(self.dictionary)} words (e.g. {examples}); evaluate on the corpus the "
                                f"model was trained on")
        else:
            add = self.dictionary.add
            for words in _lines(path):
                ids.extend(add(w) for w in words)
        if not ids:
            raise UserError(f"{path} is empty")
        return torch.tensor(ids, dtype=torch.long)

    @property
    def train(self) -> torch.Tensor:
        return self.splits["train"]

    @property
    def valid(self) -> torch.Tensor:
        return self.splits["valid"]

    @property
    def test(self) -> torch.Tensor:
        return self.splits["test"]

    @property
    def vocab(self) -> list[str]:
        return list(self.dictionary.idx2word)

    def __len__(self) -> int:
        return len(self.dictionary)


def batchify(data: torch.Tensor, bsz: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into ``bsz`` columns (dropping the remainder): shape (rows, bsz)."""
    nbatch = data.numel() // bsz
    if nbatch < 2:
        raise UserError(f"{data.numel()} tokens are too few for batch size {bsz}; use a smaller batch size")
    return data[: nbatch * bsz].view(bsz, nbatch).t().contiguous().to(device)


def get_batch(source: torch.Tensor, i: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``i .. i+seq_len-1`` as input and the next token of each as target (shorter at the end)."""
    seq_len = min(seq_len, source.shape[0] - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len]
