"""Word corpora: the original vocabulary order, the published PTB statistics, batching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dartsnas.data.text import Corpus, batchify, get_batch
from dartsnas.errors import UserError


def test_ptb_statistics(ptb_dir: Path):
    corpus = Corpus(ptb_dir)
    assert corpus.train.numel() == 929_589
    assert corpus.valid.numel() == 73_760
    assert corpus.test.numel() == 82_430
    assert len(corpus) == 10_000
    # First appearance order: the first line of train.txt numbers the first words, <eos> closes it.
    first_line = (ptb_dir / "train.txt").read_text().splitlines()[0].split()
    assert corpus.vocab[: len(first_line)] == first_line
    assert corpus.vocab[len(first_line)] == "<eos>"


def test_vocabulary_is_first_appearance_over_train_valid_test(tmp_path: Path):
    (tmp_path / "train.txt").write_text("b a\na c\n")
    (tmp_path / "valid.txt").write_text("d b\n")
    (tmp_path / "test.txt").write_text("e\n")
    corpus = Corpus(tmp_path)
    assert corpus.vocab == ["b", "a", "<eos>", "c", "d", "e"]
    assert corpus.train.tolist() == [0, 1, 2, 1, 3, 2]
    assert corpus.valid.tolist() == [4, 0, 2]
    assert corpus.test.tolist() == [5, 2]


def test_fixed_vocabulary_rejects_unknown_words(tmp_path: Path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text("a b\n")
    (tmp_path / "test.txt").write_text("a zebra\n")
    with pytest.raises(UserError, match="outside the model's vocabulary.*'zebra'"):
        Corpus(tmp_path, vocab=["a", "b", "<eos>"], splits=("valid", "test"))
    # Only the splits asked for are read.
    assert Corpus(tmp_path, vocab=["a", "b", "<eos>"], splits=("valid",)).valid.tolist() == [0, 1, 2]


def test_missing_folder_and_files_are_user_errors(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        Corpus(tmp_path / "nope")
    (tmp_path / "train.txt").write_text("a\n")
    with pytest.raises(UserError, match="valid.txt"):
        Corpus(tmp_path)


def test_batchify_columns_are_contiguous_streams_and_get_batch_shifts_by_one():
    data = torch.arange(23)
    source = batchify(data, 4)
    assert source.shape == (5, 4)
    assert source[:, 1].tolist() == [5, 6, 7, 8, 9]
    x, y = get_batch(source, 0, 3)
    assert torch.equal(y, source[1:4]) and torch.equal(x, source[0:3])
    x, y = get_batch(source, 3, 3)  # shorter at the end
    assert x.shape[0] == 1 and torch.equal(y, source[4:5])
    with pytest.raises(UserError, match="too few"):
        batchify(torch.arange(5), 4)
