"""Genotypes: derivation by the paper's rule, serialisation, and safe parsing of printed strings."""

from __future__ import annotations

import json

import pytest

from dartsnas.errors import UserError
from dartsnas.genotype import (
    CNN_PRIMITIVES,
    NAMED,
    RNN_PRIMITIVES,
    Genotype,
    RecurrentGenotype,
    derive_cnn_cell,
    derive_rnn_cell,
    from_dict,
    get_genotype,
    list_genotypes,
    load_genotype,
    parse_printed,
)

P = CNN_PRIMITIVES  # none, max_pool, avg_pool, skip, sep3, sep5, dil3, dil5


def row(**weights: float) -> list[float]:
    """A softmax-like row: small uniform weights, with the given ops raised."""
    r = [0.01] * len(P)
    for name, w in weights.items():
        r[P.index(name)] = w
    return r


def test_derive_cnn_cell_known_answer():
    # Node 2 (edges from 0, 1); node 3 (0, 1, 2); two nodes only (steps=2).
    weights = [
        row(none=0.9, sep_conv_3x3=0.05),  # 0->2: 'none' dominates but is ignored; strength 0.05
        row(skip_connect=0.3),  # 1->2: strength 0.3
        row(dil_conv_5x5=0.2),  # 0->3
        row(max_pool_3x3=0.25, avg_pool_3x3=0.25),  # 1->3: tie -> first primitive (max_pool)
        row(sep_conv_5x5=0.6),  # 2->3
    ]
    gene = derive_cnn_cell(weights, P, steps=2)
    # Strongest edge first within each node, 'none' never chosen.
    assert gene == [("skip_connect", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 2), ("max_pool_3x3", 1)]


def test_derive_cnn_cell_excludes_none_from_edge_strength():
    weights = [row(none=0.99), row(sep_conv_3x3=0.02), row(none=0.99), row(none=0.99), row(dil_conv_3x3=0.5)]
    gene = derive_cnn_cell(weights, P, steps=2)
    assert gene[0] == ("sep_conv_3x3", 1)
    assert gene[2] == ("dil_conv_3x3", 2)


def test_derive_rnn_cell_known_answer():
    R = RNN_PRIMITIVES  # none, tanh, relu, sigmoid, identity

    def r(**w: float) -> list[float]:
        out = [0.1] * len(R)
        for k, v in w.items():
            out[R.index(k)] = v
        return out

    weights = [
        r(relu=0.5),  # node 1 <- 0
        r(none=0.9), r(sigmoid=0.4),  # node 2 <- 0 (none only), 1
        r(tanh=0.3), r(identity=0.35), r(relu=0.2),  # node 3 <- 0, 1, 2
    ]
    assert derive_rnn_cell(weights, R, steps=3) == [("relu", 0), ("sigmoid", 1), ("identity", 1)]


def test_json_and_printed_round_trip_every_named_genotype():
    for name, g in NAMED.items():
        assert from_dict(json.loads(g.to_json())) == g, name
        assert parse_printed(str(g)) == g, name


def test_authors_printed_form_with_range_is_accepted():
    text = ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
            "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
            "normal_concat=range(2, 6), reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
            "('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), "
            "('max_pool_3x3', 1)], reduce_concat=range(2, 6))")
    assert parse_printed(text) == NAMED["DARTS_V2"]
    rnn = ("Genotype(recurrent=[('sigmoid', 0), ('relu', 1), ('relu', 1), ('identity', 1), ('tanh', 2), "
           "('sigmoid', 5), ('tanh', 3), ('relu', 5)], concat=range(1, 9))")
    assert parse_printed(rnn) == NAMED["DARTS_V2_RNN"]


@pytest.mark.parametrize("hostile", [
    "__import__('os').system('echo pwned')",
    "Genotype(normal=__import__('os').system('x'), normal_concat=[2], reduce=[], reduce_concat=[2])",
    "Genotype(normal=[('sep_conv_3x3', 0)] * 8, normal_concat=[2], reduce=[], reduce_concat=[2])",
    "Genotype(normal=open('/etc/passwd').read(), normal_concat=[2], reduce=[], reduce_concat=[2])",
    "Genotype(**{'normal': []})",
    "(lambda: 1)()",
    "Genotype(normal=[(x, 0) for x in 'ab'], normal_concat=[2], reduce=[], reduce_concat=[2])",
])
def test_hostile_strings_are_rejected_without_running(hostile, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError):
        load_genotype(hostile)


def test_unknown_operation_is_named():
    g = NAMED["DARTS_V2"].to_dict()
    g["normal"][3] = ["conv_9x9", 1]
    with pytest.raises(UserError, match=r"normal\[3\].*'conv_9x9'"):
        from_dict(g)


def test_out_of_range_input_is_named():
    g = NAMED["DARTS_V2"].to_dict()
    g["reduce"][2] = ["skip_connect", 3]  # edge 2 feeds node 3, whose inputs are 0..2
    with pytest.raises(UserError, match=r"reduce\[2\].*node 3"):
        from_dict(g)
    g = NAMED["DARTS_V2"].to_dict()
    g["normal_concat"] = [2, 3, 4, 9]
    with pytest.raises(UserError, match="normal_concat contains 9"):
        from_dict(g)


def test_load_from_name_file_and_run_dir(tmp_path):
    assert load_genotype("darts") == NAMED["DARTS_V2"]
    assert load_genotype("DARTS", kind="rnn") == NAMED["DARTS_V2_RNN"]
    path = tmp_path / "genotype.json"
    path.write_text(NAMED["NASNet"].to_json())
    assert load_genotype(str(path)) == NAMED["NASNet"]
    assert load_genotype(str(tmp_path)) == NAMED["NASNet"]  # a run directory
    printed = tmp_path / "g.txt"
    printed.write_text(str(NAMED["AmoebaNet"]))
    assert load_genotype(str(printed)) == NAMED["AmoebaNet"]
    with pytest.raises(UserError, match="unknown architecture"):
        load_genotype("DARTS_V3")
    with pytest.raises(UserError, match="does not exist"):
        load_genotype(str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match=r"recurrent \(RNN\) genotype"):
        load_genotype("ENAS", kind="cnn")


def test_registry_lists_paper_cells():
    assert {"DARTS", "DARTS_V1", "DARTS_V2", "NASNet", "AmoebaNet"} <= set(list_genotypes("cnn"))
    assert {"ENAS", "DARTS_V2_RNN"} <= set(list_genotypes("rnn"))
    assert get_genotype("DARTS") is get_genotype("DARTS_V2")
    assert isinstance(NAMED["ENAS"], RecurrentGenotype)
    assert NAMED["NASNet"].steps == 5 and NAMED["DARTS"].steps == 4
    assert isinstance(NAMED["DARTS"], Genotype)


def test_random_cells_are_valid_reproducible_and_uniform():
    import collections

    from dartsnas.genotype import CNN_PRIMITIVES, RNN_PRIMITIVES, random_genotype

    assert random_genotype(7) == random_genotype(7) and random_genotype(7) != random_genotype(8)
    pairs: dict[int, collections.Counter] = {k: collections.Counter() for k in range(4)}
    ops: collections.Counter = collections.Counter()
    draws = 3000
    for seed in range(draws):
        g = random_genotype(seed)
        for cell in (g.normal, g.reduce):
            for k in range(4):
                (op_a, a), (op_b, b) = cell[2 * k], cell[2 * k + 1]
                assert 0 <= a < b < k + 2  # two distinct earlier nodes
                pairs[k][(a, b)] += 1
                ops.update((op_a, op_b))
        assert list(g.normal_concat) == [2, 3, 4, 5]
    assert "none" not in ops and set(ops) == set(CNN_PRIMITIVES[1:])
    # Each of the C(k+2, 2) input pairs of node k, and each of the 7 operations, equally likely: within
    # five standard deviations of the binomial count (a fixed set of seeds, so this never flakes).
    for k, counter in pairs.items():
        n_pairs = (k + 2) * (k + 1) // 2
        assert len(counter) == n_pairs
        total, p = 2 * draws, 1 / n_pairs
        for count in counter.values():
            assert abs(count - total * p) <= 5 * (total * p * (1 - p)) ** 0.5
    total, p = sum(ops.values()), 1 / 7
    assert all(abs(c - total * p) < 5 * (total * p * (1 - p)) ** 0.5 for c in ops.values())
    # Recurrent: node i takes one of nodes 0..i and an activation other than none.
    inputs: collections.Counter = collections.Counter()
    for seed in range(draws):
        g = random_genotype(seed, "rnn")
        assert list(g.concat) == list(range(1, 9))
        for i, (op, j) in enumerate(g.recurrent):
            assert op in RNN_PRIMITIVES[1:] and 0 <= j <= i
            if i == 3:
                inputs[j] += 1
    assert all(abs(c - draws / 4) < 5 * (draws * 0.25 * 0.75) ** 0.5 for c in inputs.values())


def test_random_command_prints_a_cell_that_loads(capsys):
    from dartsnas.cli import main

    assert main(["genotypes", "random", "--seed", "5", "--json"]) == 0
    text = capsys.readouterr().out.strip()
    assert load_genotype(text) == load_genotype(text) and load_genotype(text).kind == "cnn"
    assert main(["genotypes", "random", "--seed", "5", "--kind", "rnn"]) == 0
    assert load_genotype(capsys.readouterr().out.strip()).kind == "rnn"
    assert main(["genotypes", "random", "DARTS"]) == 2
