"""The command-line layer: grouped help, one-line errors, aliases, and no torch for help or genotypes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dartsnas.cli import build_parser, main
from dartsnas.config import make_config
from dartsnas.settings.search_cnn import SearchConfig
from dartsnas.settings.train_cnn import CifarTrainConfig, ImageNetTrainConfig

SRC = str(Path(__file__).resolve().parents[1] / "src")


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def error_line(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dartsnas: error: ") and err.count("\n") == 1, err
    return err.strip()


def test_help_groups_options_and_shows_choices(capsys):
    text = help_text(["search", "cnn"], capsys)
    for heading in ("data:", "optimisation:", "architecture search:", "speed and memory:", "output:", "runtime:"):
        assert f"\n{heading}\n" in text
    assert "--hvp {fd,exact}" in text and "--dataset {cifar10,npz,digits,folder}" in text
    assert "--unrolled / --no-unrolled" in text
    assert text.startswith("usage: dartsnas search cnn [options]\n")


@pytest.mark.parametrize("argv", [["search", "cnn"], ["search", "rnn"], ["train", "cifar10"], ["train", "imagenet"],
                                  ["train", "wt2"], ["test", "cifar10"], ["test", "ptb"], ["info"]])
def test_help_lists_each_flag_and_default_once(argv, capsys):
    text = help_text(argv, capsys)
    lines = text.splitlines()
    assert not any("(default:" in line and line.count("(default:") > 1 for line in lines)
    assert "default: None" not in text
    # Dashed spellings and aliases work but are not listed.
    assert "--batch-size" not in text and "--lr " not in text and "--wdecay" not in text
    flags = [line.split()[0] for line in lines if line.startswith("  --")]
    assert len(flags) == len(set(flags))


def test_protocol_help_is_short(capsys):
    text = help_text(["protocol", "cnn"], capsys)
    assert len(text.splitlines()) < 80 and "--search.NAME" in text and "epochs 100" in " ".join(text.split())


def test_unknown_flag_suggests_the_near_one(capsys):
    err = error_line(["search", "cnn", "--lyers", "3"], capsys)
    assert "did you mean --layers?" in err and "dartsnas search cnn --help" in err
    assert "did you mean --no-auxiliary?" in error_line(["train", "cifar10", "--no-auxilary"], capsys)


def test_bad_choice_and_bad_type_are_one_line(capsys):
    assert error_line(["search", "cnn", "--hvp", "fdd"], capsys) == (
        "dartsnas: error: --hvp must be one of fd, exact (got 'fdd')")
    assert "--epochs must be an integer (got 'many')" in error_line(["search", "cnn", "--epochs", "many"], capsys)
    assert "--layers needs a value" in error_line(["search", "cnn", "--layers"], capsys)


def test_commands_and_targets_missing_or_unknown(capsys):
    assert "search, train, test" in error_line([], capsys)
    assert "needs a target: cnn, rnn" in error_line(["search"], capsys)
    err = error_line(["serch"], capsys)
    assert "unknown command 'serch'" in err and "did you mean search?" in err
    assert "unknown target 'cnnn'" in error_line(["search", "cnnn"], capsys)


def test_abbreviations_are_refused(capsys):
    assert "unknown option --arch" in error_line(["search", "cnn", "--arch", "DARTS"], capsys)
    assert "unknown option --learning" in error_line(["search", "cnn", "--learning", "0.1"], capsys)


@pytest.mark.parametrize("argv, cls", [(["search", "cnn"], SearchConfig), (["train", "cifar10"], CifarTrainConfig),
                                       (["train", "imagenet"], ImageNetTrainConfig)])
def test_lr_is_learning_rate(argv, cls):
    parser = build_parser()
    short = make_config(cls, parser.parse_args([*argv, "--lr", "0.05"]))
    long = make_config(cls, parser.parse_args([*argv, "--learning_rate", "0.05"]))
    dashed = make_config(cls, parser.parse_args([*argv, "--learning-rate", "0.05"]))
    assert short == long == dashed and short.learning_rate == 0.05


def test_dashed_spellings_and_switches_still_work():
    args = build_parser().parse_args(["search", "cnn", "--init-channels", "4", "--no-plots", "--unrolled"])
    cfg = make_config(SearchConfig, args)
    assert (cfg.init_channels, cfg.plots, cfg.unrolled) == (4, False, True)


@pytest.mark.parametrize("code", [
    ("from dartsnas.cli import build_parser; p = build_parser(); "
     "[p.parse_args(a) for a in (['search', 'cnn'], ['train', 'wt2'], ['test', 'imagenet'], ['plot', 'cell', 'X'])]"),
    "from dartsnas.cli import main; main(['genotypes'])",
    "from dartsnas.cli import main\ntry:\n    main(['search', 'cnn', '--help'])\nexcept SystemExit:\n    pass",
])
def test_help_and_genotypes_do_not_import_torch(code):
    env = {**os.environ, "PYTHONPATH": SRC}
    check = f"{code}\nimport sys\nassert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("argv", [["plot", "curves", "somewhere"], ["plot", "search", "somewhere"]])
def test_plot_without_matplotlib_is_one_line(argv, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err and 'pip install "dartsnas[viz]"' in err


def test_plot_cell_renders_with_the_dot_program_alone(monkeypatch, tmp_path, capsys):
    import shutil

    if shutil.which("dot") is None:
        pytest.skip("the Graphviz dot program is not installed")
    monkeypatch.setitem(sys.modules, "graphviz", None)  # no Python binding: dot is run directly
    out = tmp_path / "cell.svg"
    assert main(["plot", "cell", "DARTS_V2", "--cell", "normal", "-o", str(out)]) == 0
    assert out.read_text().lstrip().startswith("<?xml") and str(out) in capsys.readouterr().out
