"""Hostile and damaged input: every parser answers with the package's own one-line error, never with
another exception, a huge allocation or a deep recursion."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dartsnas.errors import UserError
from dartsnas.genotype import Genotype, RecurrentGenotype, get_genotype, load_genotype, parse_printed
from dartsnas.rundir import atomic_write, write_text

HOSTILE = [
    "Genotype(normal=" + "[" * 5000 + "]" * 5000 + ")",
    "Genotype(normal=[('sep_conv_3x3', " + "9" * 5000 + ")], normal_concat=[2], reduce=[], reduce_concat=[2])",
    "Genotype(normal=[], normal_concat=range(2, 6, 0), reduce=[], reduce_concat=[2])",
    "Genotype(normal=[], normal_concat=range(-10**9), reduce=[], reduce_concat=[2])",
    "Genotype(normal=[('a', 0)]\x00)",
    "Genotype(**{'normal': []})",
    "Genotype(normal=__import__('os').system('true'))",
    "Genotype(" + "x" * 200_000 + ")",
    '{"normal": [["sep_conv_3x3", ' + "1" * 5000 + ']], "normal_concat": [], "reduce": [], "reduce_concat": []}',
    '{"recurrent": ' + "[" * 100_000 + "]" * 100_000 + ', "concat": []}',
    "{" + '"a":' * 10,
    "DARTS_" + "V" * 10_000,
]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_genotype_strings_give_one_short_line(text: str):
    with pytest.raises(UserError) as info:
        load_genotype(text)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400


def test_genotype_files_that_cannot_be_read(tmp_path: Path):
    binary = tmp_path / "g.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not UTF-8"):
        load_genotype(str(binary))
    big = tmp_path / "big.json"
    big.write_text("{" + " " * 200_000 + "}")
    with pytest.raises(UserError, match="larger than"):
        load_genotype(str(big))
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.json"
        locked.write_text(get_genotype("DARTS_V2").to_json())
        locked.chmod(0)
        with pytest.raises(UserError, match="cannot read"):
            load_genotype(str(locked))


def test_genotype_parser_fuzz():
    hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e '.[test]')")
    from hypothesis import strategies as st

    pieces = st.sampled_from(["Genotype(", "normal=", "reduce=", "normal_concat=", "reduce_concat=", "recurrent=",
                              "concat=", "[", "]", "(", ")", ",", "'sep_conv_3x3'", "'skip_connect'", "'none'", "0",
                              "1", "2", "-1", "99999999999999999999", "range(2, 6)", "range(", "{", "}", '"normal":',
                              ":", "x", "\x00", "\\", "'", '"'])
    texts = st.one_of(st.text(max_size=200), st.lists(pieces, max_size=40).map("".join))

    @hypothesis.settings(max_examples=400, deadline=None, derandomize=True)
    @hypothesis.given(texts)
    def check(text: str) -> None:
        try:
            genotype = load_genotype(text)
        except UserError as exc:
            assert "\n" not in str(exc)
            return
        # Accepted: it round-trips through both of its written forms.
        assert isinstance(genotype, (Genotype, RecurrentGenotype))
        assert parse_printed(str(genotype)) == genotype
        assert load_genotype(genotype.to_json()) == genotype

    check()


def test_a_full_disk_keeps_the_previous_file_and_says_so(tmp_path: Path, monkeypatch):
    target = tmp_path / "metrics.jsonl"
    write_text(target, "old\n")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="No space left on device; its previous version, if any, is intact"):
        atomic_write(target, lambda f: f.write(b"new\n"))
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_image_files_with_impossible_labels_or_sizes(tmp_path: Path):
    import numpy as np

    from dartsnas.data.images import read_npz

    def npz(name: str, **arrays) -> Path:
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        return path

    x = np.zeros((4, 8, 8, 3), np.uint8)
    cases = {
        "wrap": ({"x": x, "y": np.array([0, 1, 2, 2**63], np.uint64)}, "must be below"),
        "huge": ({"x": x, "y": np.array([0, 1, 2, 2**40], np.int64)}, "must be below"),
        "tiny": ({"x": np.zeros((4, 2, 2, 3), np.uint8), "y": np.zeros(4, np.int64)}, "too small"),
        "emptytest": ({"x": x, "y": np.zeros(4, np.int64), "x_test": x[:0], "y_test": np.zeros(0, np.int64)},
                      "no images"),
    }
    for name, (arrays, fragment) in cases.items():
        with pytest.raises(UserError, match=fragment):
            read_npz(npz(name, **arrays))


def test_corpus_that_is_not_utf8(tmp_path: Path):
    from dartsnas.data.text import Corpus

    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        Corpus(tmp_path)


class _Expands:
    def __reduce__(self):
        return (frozenset, (range(10**9),))


def test_a_tiny_pickle_cannot_expand_into_gigabytes(tmp_path: Path):
    import torch

    from dartsnas.engine.evaluate_rnn import load_rnn_model

    path = tmp_path / "bomb.pt"
    torch.save({"model": _Expands()}, path)
    assert path.stat().st_size < 4096
    with pytest.raises(UserError, match="refusing to load .*range of 1,000,000,000 elements"):
        load_rnn_model(path)


def test_hostile_settings_files_give_one_short_line(tmp_path: Path):
    from dartsnas.config import load_yaml_mapping

    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8))
    cases = {
        "laughs.yaml": (laughs.encode(), "aliases"),
        "binary.yaml": (b"\xff\xfe\x00\x01", "not UTF-8"),
        "big.yaml": (b"a: 1\n" + b"#" * 1_100_000, "larger than"),
        "deep.yaml": (b"a: " + b"[" * 100_000, "not valid YAML"),
    }
    for name, (content, fragment) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(UserError, match=fragment) as info:
            load_yaml_mapping(path)
        assert "\n" not in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize("flag, value, fragment", [
    ("--threads", "100000", "--threads must be between 1 and"),
    ("--seed", str(2**70), "--seed must be between 0 and"),
    ("--device", "meta", "--device must be auto, cpu, cuda or cuda:N"),
])
def test_absurd_runtime_settings_are_refused(flag: str, value: str, fragment: str, tmp_path: Path, capsys):
    from dartsnas.cli import main

    assert main(["search", "cnn", "--dataset", "digits", "--save", str(tmp_path / "r"), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory) -> Path:
    from dartsnas.engine import search_cnn
    from dartsnas.engine.search_cnn import SearchConfig

    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    search_cnn.run(SearchConfig(dataset="digits", save=str(run_dir), layers=3, init_channels=2, nodes=2, batch_size=64,
                                epochs=2, max_steps=1, plots=False, threads=1))
    return run_dir


def _damaged_copy(src: Path, dst: Path, damage) -> Path:
    import shutil

    shutil.copytree(src, dst)
    damage(dst)
    return dst


def _drop_rng(run_dir: Path) -> None:
    import torch

    path = run_dir / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    state.pop("rng")
    state.pop("checksum")
    torch.save(state, path)


def _edit_config(text: str):
    def damage(run_dir: Path) -> None:
        (run_dir / "config.yaml").write_text(text)
    return damage


def _layers_as_text(run_dir: Path) -> None:
    import yaml

    data = yaml.safe_load((run_dir / "config.yaml").read_text())
    data["config"]["layers"] = "three"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(data))


DAMAGES = {
    "checkpoint without rng": (_drop_rng, "lacks 'rng'"),
    "config.yaml not YAML": (_edit_config("a: [1, 2\nb: :"), "cannot be read"),
    "config.yaml a list": (_edit_config("- 1\n- 2\n"), "does not hold a run's settings"),
    "config.yaml without settings": (_edit_config("command: search-cnn\n"), "does not hold a run's settings"),
    "config.yaml python tag": (_edit_config("command: !!python/object/apply:os.system ['true']\n"), "cannot be read"),
    "config.yaml latin-1": (lambda d: (d / "config.yaml").write_bytes(b"command: caf\xe9\n"), "cannot be read"),
    "layers as text": (_layers_as_text, "must be int"),
    "empty checkpoint": (lambda d: (d / "checkpoints" / "last.pt").write_bytes(b""), "cannot load checkpoint"),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_resume_of_a_damaged_run_directory_is_one_line(name: str, finished_search: Path, tmp_path: Path, capsys):
    from dartsnas.cli import main

    damage, fragment = DAMAGES[name]
    run_dir = _damaged_copy(finished_search, tmp_path / "copy", damage)
    capsys.readouterr()
    assert main(["search", "cnn", "--resume", str(run_dir), "--max_steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


def test_damaged_metrics_lines_are_skipped(finished_search: Path, tmp_path: Path):
    from dartsnas.rundir import RunDir

    run_dir = _damaged_copy(finished_search, tmp_path / "copy", lambda d: None)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write("garbage\n7\n")
    rd = RunDir(run_dir)
    assert [m["epoch"] for m in rd.read_metrics()] == [1]
    rd.truncate_metrics(1)
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 1


def test_damaged_weight_files_are_one_line(tmp_path: Path, capsys):
    import torch
    from safetensors.torch import save_file

    from dartsnas.cli import main

    def weights(name: str, tensors: dict, meta: dict) -> Path:
        path = tmp_path / name
        save_file(tensors, str(path), metadata=meta)
        return path

    cases = [
        weights("config_list.safetensors", {"stem.0.weight": torch.zeros(6, 3, 3, 3)}, {"config": "[1, 2]"}),
        weights("big_int.safetensors", {"a": torch.zeros(1)}, {"genotype": '{"normal": ' + "1" * 5000 + "}"}),
        weights("scalar_stem.safetensors", {"stem.0.weight": torch.zeros(()), "classifier.weight": torch.zeros(())},
                {}),
    ]
    zero = tmp_path / "zero.pt"
    zero.write_bytes(b"")
    for path in cases:
        assert main(["test", "cifar10", "--model_path", str(path), "--arch", "DARTS_V2"]) == 2, path
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("dartsnas: error:"), err
    assert main(["test", "ptb", "--model_path", str(zero)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot load" in err
