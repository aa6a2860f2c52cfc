"""``dartsnas info`` for the recurrent evaluation networks (the CNN ones are tested with the models)."""

from __future__ import annotations

from dartsnas.cli import main


def test_info_prints_the_papers_recurrent_parameter_counts(capsys):
    assert main(["info", "DARTS", "--dataset", "ptb"]) == 0
    assert "22,960,000" in capsys.readouterr().out
    assert main(["info", "DARTS_V2", "--dataset", "wt2"]) == 0
    out = capsys.readouterr().out
    assert "700 units" in out and "33.1" in out  # the paper's 33M


def test_info_rejects_a_cnn_cell_for_a_language_model(capsys):
    assert main(["info", "NASNet", "--dataset", "ptb"]) == 2
    err = capsys.readouterr().err
    assert "recurrent (RNN)" in err and len(err.strip().splitlines()) == 1
