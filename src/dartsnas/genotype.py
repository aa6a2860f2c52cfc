"""Genotypes: the discrete architectures DARTS searches for and trains.

One canonical type per search space, importable without torch:

* :class:`Genotype` - a convolutional genotype (normal and reduction cell), paper section 2.1.
* :class:`RecurrentGenotype` - a recurrent cell (paper section 2.1, recurrent cells).

Genotypes travel as JSON (``to_dict`` / ``from_dict``) and are also accepted in the form the
authors' code prints (``Genotype(normal=[('sep_conv_3x3', 1), ...], normal_concat=range(2, 6), ...)``).
That form is parsed with :mod:`ast` and a whitelist of literal shapes; it is never evaluated.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UserError

# The order fixes the columns of alpha (the authors' code, cnn/genotypes.py ``PRIMITIVES``); ``none`` is column 0.
CNN_PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
# Final networks also know the operations NASNet and AmoebaNet use.
CNN_FINAL_OPS: tuple[str, ...] = CNN_PRIMITIVES[1:] + ("sep_conv_7x7", "conv_7x1_1x7")

RNN_PRIMITIVES: tuple[str, ...] = ("none", "tanh", "relu", "sigmoid", "identity")
RNN_FINAL_OPS: tuple[str, ...] = RNN_PRIMITIVES[1:]

Edge = tuple[str, int]


def check_primitives(names: Sequence[str], known: Sequence[str], flag: str = "--primitives") -> tuple[str, ...]:
    """The operation set of a search, checked against the ``known`` ones; its order fixes the columns of alpha.

    A search chooses among these operations on every edge (paper section 2.1: the candidate set O);
    ``none`` only lets an edge fade out and is never derived (section 2.4), so a set needs at least one
    other operation. Bad sets raise :class:`UserError` with one line naming the fix.
    """
    names = tuple(names)
    if not names:
        raise UserError(f"{flag} is empty; give a comma-separated list of operations from: {', '.join(known)}")
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{flag}: unknown operation {_show(name)}{hint}; known operations: {', '.join(known)}")
    repeated = sorted({n for n in names if names.count(n) > 1}, key=names.index)
    if repeated:
        raise UserError(f"{flag} lists {', '.join(repeated)} more than once; give each operation once")
    if all(name == "none" for name in names):
        raise UserError(f"{flag} has only 'none', which is never chosen as an edge's operation; add at least one "
                        f"of: {', '.join(k for k in known if k != 'none')}")
    return names

# Limits for text from users: a genotype is a few hundred characters, a few levels deep, with small
# node indices; anything far past that is refused before it can cost memory or recursion.
MAX_TEXT = 100_000
MAX_DEPTH = 6
MAX_INDEX = 1_000_000


def _show(item: Any) -> str:
    """A short, always printable repr for error messages (huge integers have no repr of their own)."""
    try:
        text = repr(item)
    except ValueError:
        text = f"<{type(item).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _edges(items: Iterable[Any], where: str) -> tuple[Edge, ...]:
    out = []
    for k, item in enumerate(items):
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise UserError(f"{where}[{k}] is {_show(item)}; each edge must be an (operation, input) pair")
        op, idx = item
        if not isinstance(op, str) or isinstance(idx, bool) or not isinstance(idx, int) or abs(idx) > MAX_INDEX:
            raise UserError(f"{where}[{k}] is {_show(item)}; expected a pair like ('sep_conv_3x3', 0)")
        out.append((op, idx))
    return tuple(out)


def _ints(items: Iterable[Any], where: str) -> tuple[int, ...]:
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or abs(item) > MAX_INDEX:
            raise UserError(f"{where} contains {_show(item)}; node indices must be small integers")
        out.append(item)
    return tuple(out)


@dataclass(frozen=True)
class Genotype:
    """A convolutional architecture: two cells, each a list of ``(op, input)`` edges.

    Edges come in pairs: edges ``2k`` and ``2k+1`` feed intermediate node ``k + 2``. Inputs 0 and
    1 are the outputs of the previous two cells, ``i >= 2`` the earlier intermediate nodes. The
    cell output concatenates the nodes listed in ``*_concat``.
    """

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "normal", _edges(self.normal, "normal"))
        object.__setattr__(self, "reduce", _edges(self.reduce, "reduce"))
        object.__setattr__(self, "normal_concat", _ints(self.normal_concat, "normal_concat"))
        object.__setattr__(self, "reduce_concat", _ints(self.reduce_concat, "reduce_concat"))
        for name in ("normal", "reduce"):
            _check_conv_cell(name, getattr(self, name), getattr(self, name + "_concat"))

    kind = "cnn"

    @property
    def steps(self) -> int:
        """Number of intermediate nodes per cell (4 for DARTS cells, 5 for NASNet/AmoebaNet)."""
        return len(self.normal) // 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "normal": [list(e) for e in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(e) for e in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def parse(cls, spec: str | os.PathLike[str] | Genotype) -> Genotype:
        """A convolutional genotype from anything ``--arch`` accepts: a name (``DARTS_V2``), a
        genotype.json, a search run directory, the printed ``Genotype(...)`` form or its JSON."""
        genotype = load_genotype(spec, kind="cnn")
        assert isinstance(genotype, Genotype)
        return genotype

    @classmethod
    def derive(cls, normal: Sequence[Sequence[float]], reduce: Sequence[Sequence[float]],
               primitives: Sequence[str] = CNN_PRIMITIVES) -> Genotype:
        """The discrete cell of softmaxed mixing weights (paper section 2.4): per node, the two strongest
        incoming edges, each with its strongest operation other than ``none``. ``normal`` and ``reduce``
        hold one row per edge in cell order (2, 3, 4, ... edges per node; tensors or nested lists), one
        column per primitive; every intermediate node is concatenated, as in the search network."""
        rows = [list(map(float, r)) for r in (normal.tolist() if hasattr(normal, "tolist") else normal)]
        reduce_rows = [list(map(float, r)) for r in (reduce.tolist() if hasattr(reduce, "tolist") else reduce)]
        steps = 0
        while sum(range(2, steps + 2)) < len(rows):
            steps += 1
        if steps == 0 or sum(range(2, steps + 2)) != len(rows) or len(reduce_rows) != len(rows):
            raise UserError(f"mixing weights need 2 + 3 + ... rows (one per edge of 2, 3, ... nodes) and as many "
                            f"for both cells, got {len(rows)} and {len(reduce_rows)}")
        if any(len(r) != len(primitives) for r in rows + reduce_rows):
            raise UserError(f"every row of mixing weights needs one column per primitive ({len(primitives)})")
        concat = list(range(2, steps + 2))
        return cls(derive_cnn_cell(rows, primitives, steps), concat, derive_cnn_cell(reduce_rows, primitives, steps),
                   concat)

    def __str__(self) -> str:
        # The authors' printed form, so that users can paste it into papers and other code bases.
        return (
            f"Genotype(normal={list(self.normal)!r}, normal_concat={list(self.normal_concat)!r}, "
            f"reduce={list(self.reduce)!r}, reduce_concat={list(self.reduce_concat)!r})"
        )


def _check_conv_cell(name: str, edges: tuple[Edge, ...], concat: tuple[int, ...]) -> None:
    if not edges or len(edges) % 2:
        raise UserError(f"{name} has {len(edges)} edges; a cell needs two edges per intermediate node")
    steps = len(edges) // 2
    for k, (op, idx) in enumerate(edges):
        if op not in CNN_FINAL_OPS:
            raise UserError(
                f"{name}[{k}] uses unknown operation {op!r}; known operations: {', '.join(CNN_FINAL_OPS)}"
            )
        node = k // 2 + 2
        if not 0 <= idx < node:
            raise UserError(
                f"{name}[{k}] = ({op!r}, {idx}) feeds node {node} from input {idx}; "
                f"inputs of node {node} must be in 0..{node - 1}"
            )
    if not concat:
        raise UserError(f"{name}_concat is empty; list the nodes whose outputs form the cell output")
    for idx in concat:
        if not 2 <= idx < steps + 2:
            raise UserError(f"{name}_concat contains {idx}; intermediate nodes are 2..{steps + 1}")


@dataclass(frozen=True)
class RecurrentGenotype:
    """A recurrent cell: node ``k + 1`` applies ``recurrent[k] = (activation, predecessor)``.

    Node 0 is computed from ``x_t`` and ``h_{t-1}``; ``h_t`` is the mean of the nodes in ``concat``.
    """

    recurrent: tuple[Edge, ...]
    concat: tuple[int, ...]

    kind = "rnn"

    def __post_init__(self) -> None:
        object.__setattr__(self, "recurrent", _edges(self.recurrent, "recurrent"))
        object.__setattr__(self, "concat", _ints(self.concat, "concat"))
        if not self.recurrent:
            raise UserError("recurrent is empty; a recurrent cell needs at least one node")
        for k, (op, idx) in enumerate(self.recurrent):
            if op not in RNN_FINAL_OPS:
                raise UserError(
                    f"recurrent[{k}] uses unknown activation {op!r}; known: {', '.join(RNN_FINAL_OPS)}"
                )
            if not 0 <= idx <= k:
                raise UserError(f"recurrent[{k}] = ({op!r}, {idx}) feeds node {k + 1}; its input must be in 0..{k}")
        if not self.concat:
            raise UserError("concat is empty; list the nodes averaged into h_t")
        for idx in self.concat:
            if not 1 <= idx <= len(self.recurrent):
                raise UserError(f"concat contains {idx}; nodes are 1..{len(self.recurrent)}")

    @property
    def steps(self) -> int:
        return len(self.recurrent)

    def to_dict(self) -> dict[str, Any]:
        return {"recurrent": [list(e) for e in self.recurrent], "concat": list(self.concat)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        return f"Genotype(recurrent={list(self.recurrent)!r}, concat={list(self.concat)!r})"


AnyGenotype = Genotype | RecurrentGenotype


def from_dict(data: Any) -> AnyGenotype:
    """Build a genotype from its JSON dictionary; the keys decide the kind."""
    if not isinstance(data, dict):
        raise UserError(f"a genotype must be a JSON object, got {type(data).__name__}")
    data = dict(data)
    data.pop("kind", None)
    data.pop("primitives", None)  # the operation set a search chose from, kept in its genotype.json
    conv_keys = {"normal", "normal_concat", "reduce", "reduce_concat"}
    rnn_keys = {"recurrent", "concat"}
    keys = set(data)
    if keys == conv_keys:
        return Genotype(**{k: _as_list(data[k], k) for k in conv_keys})
    if keys == rnn_keys:
        return RecurrentGenotype(**{k: _as_list(data[k], k) for k in rnn_keys})
    raise UserError(
        f"genotype has fields {_show(sorted(map(str, keys)))}; expected {sorted(conv_keys)} (convolutional) "
        f"or {sorted(rnn_keys)} (recurrent)"
    )


def _as_list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise UserError(f"genotype field {_show(key)} must be a list, got {_show(value)}")
    return list(value)


# --- the authors' printed form, parsed without evaluation -------------------------------------


def _literal(node: ast.AST, where: str, depth: int = 0) -> Any:
    """Turn a whitelisted literal AST node into a value: str/int constants, lists, tuples, range()."""
    if depth > MAX_DEPTH:
        raise UserError(f"{where} is nested too deeply; a genotype is a list of ('op', index) pairs")
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int)) and not isinstance(node.value, bool):
        if isinstance(node.value, int) and abs(node.value) > MAX_INDEX:
            raise UserError(f"{where} contains an integer of {node.end_col_offset - node.col_offset} digits; node "
                            f"indices are small integers")
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        value = node.operand.value
        if isinstance(value, int) and not isinstance(value, bool):
            return -_literal(node.operand, where, depth + 1)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(elt, where, depth + 1) for elt in node.elts]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "range"
        and not node.keywords
        and 1 <= len(node.args) <= 3
    ):
        args = [_literal(a, where, depth + 1) for a in node.args]
        if all(isinstance(a, int) for a in args) and all(abs(a) < 1000 for a in args) and (len(args) < 3 or args[2]):
            return list(range(*args))
    try:
        snippet = ast.unparse(node)
    except (ValueError, RecursionError):
        snippet = type(node).__name__
    if len(snippet) > 60:
        snippet = snippet[:57] + "..."
    raise UserError(f"{where} contains {snippet!r}; only lists of ('op', index) pairs and range(a, b) are allowed")


def parse_printed(text: str) -> AnyGenotype:
    """Parse ``Genotype(normal=[...], normal_concat=range(2, 6), ...)`` (or the recurrent form).

    Only literal lists, tuples, strings, integers and ``range(...)`` are accepted; anything else
    (names, attribute access, other calls) is rejected, so hostile strings never run.
    """
    if len(text) > MAX_TEXT:
        raise UserError(f"the genotype string is {len(text):,} characters long; a genotype is a few hundred")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise UserError(f"cannot parse genotype string ({exc.msg}); expected Genotype(normal=[...], ...)") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, absurd nesting
        raise UserError(f"cannot parse genotype string ({type(exc).__name__}); expected Genotype(normal=[...], "
                        f"...)") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "Genotype"):
        raise UserError("a genotype string must look like Genotype(normal=[...], normal_concat=..., ...)")
    if call.args:
        raise UserError("genotype string must use keyword fields, e.g. Genotype(normal=[...], ...)")
    fields = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise UserError("genotype string must not use ** expansion")
        fields[kw.arg] = _literal(kw.value, kw.arg)
    return from_dict(fields)


# --- derivation from continuous weights (paper section 2.4) --------------------------------------


def _strength(row: Sequence[float], none_index: int | None) -> float:
    return max(w for k, w in enumerate(row) if k != none_index)


def _best_op(row: Sequence[float], none_index: int | None) -> int:
    # First maximum wins, like argmax: ties resolve to the earlier primitive.
    best = None
    for k, w in enumerate(row):
        if k != none_index and (best is None or w > row[best]):
            best = k
    assert best is not None
    return best


def _check_widths(weights: Sequence[Sequence[float]], primitives: Sequence[str]) -> None:
    # Column k of alpha is primitives[k]: weights of another operation set would name the wrong operations.
    for row in weights:
        if len(row) != len(primitives):
            raise ValueError(f"alpha rows have {len(row)} columns but the run has {len(primitives)} operations "
                             f"({', '.join(primitives)})")


def _none_index(primitives: Sequence[str]) -> int | None:
    return primitives.index("none") if "none" in primitives else None


def derive_cnn_cell(weights: Sequence[Sequence[float]], primitives: Sequence[str], steps: int) -> list[Edge]:
    """Keep, for every intermediate node, the two incoming edges whose strongest non-``none``
    weight is largest, each with its argmax non-``none`` operation (strongest edge first).

    Args:
        weights: softmaxed alphas, one row per edge in cell order (2, 3, 4, ... edges per node).
        primitives: the operation name of each column.
        steps: number of intermediate nodes.
    """
    none_index = _none_index(primitives)
    if len(primitives) - (none_index is not None) < 1:
        raise UserError("the primitives contain no operation besides 'none'")
    _check_widths(weights, primitives)
    gene: list[Edge] = []
    start = 0
    for i in range(steps):
        n = i + 2
        rows = weights[start:start + n]
        if len(rows) != n:
            raise ValueError(f"expected {sum(range(2, steps + 2))} edge rows, got {len(weights)}")
        # sorted() is stable, so equally strong edges keep the lower input index first.
        keep = sorted(range(n), key=lambda j: -_strength(rows[j], none_index))[:2]
        for j in keep:
            gene.append((primitives[_best_op(rows[j], none_index)], j))
        start += n
    return gene


def derive_rnn_cell(weights: Sequence[Sequence[float]], primitives: Sequence[str], steps: int) -> list[Edge]:
    """Keep, for every node, the single strongest predecessor (non-``none``) and its best activation.

    Args:
        weights: softmaxed alphas, one row per edge: node 1 has 1 predecessor, node 2 has 2, ...
    """
    none_index = _none_index(primitives)
    if len(primitives) - (none_index is not None) < 1:
        raise UserError("the primitives contain no operation besides 'none'")
    _check_widths(weights, primitives)
    gene: list[Edge] = []
    start = 0
    for i in range(steps):
        n = i + 1
        rows = weights[start:start + n]
        if len(rows) != n:
            raise ValueError(f"expected {sum(range(1, steps + 1))} edge rows, got {len(weights)}")
        j = min(range(n), key=lambda j: -_strength(rows[j], none_index))  # the first of equals, as a stable sort
        gene.append((primitives[_best_op(rows[j], none_index)], j))
        start += n
    return gene


# --- random cells (the baseline a search has to beat) -------------------------------------------


def random_genotype(seed: int, kind: str = "cnn", steps: int | None = None) -> AnyGenotype:
    """A cell drawn uniformly from the space the search derives from (paper section 2.4).

    Convolutional: in each of the two cells, every intermediate node takes two distinct earlier
    nodes as inputs (each unordered pair equally likely) and an operation other than ``none`` on each
    edge (each equally likely). Recurrent: every node takes one earlier node and an activation other
    than ``none``. This is the random baseline of Li & Talwalkar ("Random Search and Reproducibility
    for Neural Architecture Search", 2019), drawn from Python's own generator so that a seed gives
    the same cell on every machine.
    """
    if kind not in ("cnn", "rnn"):
        raise UserError(f"kind must be cnn or rnn, got {_show(kind)}")
    rng = random.Random(seed)
    if kind == "rnn":
        n = steps or 8
        ops = RNN_PRIMITIVES[1:]
        return RecurrentGenotype(recurrent=[(rng.choice(ops), rng.randrange(i + 1)) for i in range(n)],
                                 concat=list(range(1, n + 1)))
    n = steps or 4
    ops = CNN_PRIMITIVES[1:]

    def cell() -> list[Edge]:
        edges: list[Edge] = []
        for k in range(n):
            for j in sorted(rng.sample(range(k + 2), 2)):
                edges.append((rng.choice(ops), j))
        return edges

    normal = cell()
    return Genotype(normal=normal, normal_concat=list(range(2, n + 2)), reduce=cell(),
                    reduce_concat=list(range(2, n + 2)))


# --- named genotypes ----------------------------------------------------------------------------

_C = range(2, 6)

NAMED: dict[str, AnyGenotype] = {
    # Second-order search (paper Table 1, "DARTS (second order)").
    "DARTS_V2": Genotype(
        normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
                ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
        normal_concat=_C,
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
        reduce_concat=_C,
    ),
    # First-order search.
    "DARTS_V1": Genotype(
        normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
                ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
        normal_concat=_C,
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
        reduce_concat=_C,
    ),
    # NASNet-A (Zoph et al. 2018), five nodes per cell.
    "NASNet": Genotype(
        normal=[("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 0), ("sep_conv_3x3", 0),
                ("avg_pool_3x3", 1), ("skip_connect", 0), ("avg_pool_3x3", 0), ("avg_pool_3x3", 0),
                ("sep_conv_3x3", 1), ("skip_connect", 1)],
        normal_concat=[2, 3, 4, 5, 6],
        reduce=[("sep_conv_5x5", 1), ("sep_conv_7x7", 0), ("max_pool_3x3", 1), ("sep_conv_7x7", 0),
                ("avg_pool_3x3", 1), ("sep_conv_5x5", 0), ("skip_connect", 3), ("avg_pool_3x3", 2),
                ("sep_conv_3x3", 2), ("max_pool_3x3", 1)],
        reduce_concat=[4, 5, 6],
    ),
    # AmoebaNet-A (Real et al. 2019).
    "AmoebaNet": Genotype(
        normal=[("avg_pool_3x3", 0), ("max_pool_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 2),
                ("sep_conv_3x3", 0), ("avg_pool_3x3", 3), ("sep_conv_3x3", 1), ("skip_connect", 1),
                ("skip_connect", 0), ("avg_pool_3x3", 1)],
        normal_concat=[4, 5, 6],
        reduce=[("avg_pool_3x3", 0), ("sep_conv_3x3", 1), ("max_pool_3x3", 0), ("sep_conv_7x7", 2),
                ("sep_conv_7x7", 0), ("avg_pool_3x3", 1), ("max_pool_3x3", 0), ("max_pool_3x3", 1),
                ("conv_7x1_1x7", 0), ("sep_conv_3x3", 5)],
        reduce_concat=[3, 4, 6],
    ),
    # Recurrent cells (paper Table 2).
    "DARTS_V2_RNN": RecurrentGenotype(
        recurrent=[("sigmoid", 0), ("relu", 1), ("relu", 1), ("identity", 1),
                   ("tanh", 2), ("sigmoid", 5), ("tanh", 3), ("relu", 5)],
        concat=range(1, 9),
    ),
    "DARTS_V1_RNN": RecurrentGenotype(
        recurrent=[("relu", 0), ("relu", 1), ("tanh", 2), ("relu", 3),
                   ("relu", 4), ("identity", 1), ("relu", 5), ("relu", 1)],
        concat=range(1, 9),
    ),
    "ENAS": RecurrentGenotype(
        recurrent=[("tanh", 0), ("tanh", 1), ("relu", 1), ("tanh", 3), ("tanh", 3), ("relu", 3),
                   ("relu", 4), ("relu", 7), ("relu", 8), ("relu", 8), ("relu", 8)],
        concat=[2, 5, 6, 9, 10, 11],
    ),
}
NAMED["DARTS"] = NAMED["DARTS_V2"]
NAMED["DARTS_RNN"] = NAMED["DARTS_V2_RNN"]

# The authors use the same names (DARTS, DARTS_V1, DARTS_V2) for the CNN and the RNN cells; which
# one is meant follows from the search space of the command.
_RNN_ALIASES = {"DARTS": "DARTS_V2_RNN", "DARTS_V2": "DARTS_V2_RNN", "DARTS_V1": "DARTS_V1_RNN"}


def list_genotypes(kind: str | None = None) -> list[str]:
    """Names of the registered genotypes, optionally only those of ``kind`` ('cnn' or 'rnn')."""
    return [name for name, g in NAMED.items() if kind is None or g.kind == kind]


def get_genotype(name: str, kind: str | None = None) -> AnyGenotype:
    """Look up a named genotype; ``kind='rnn'`` maps DARTS/DARTS_V1/DARTS_V2 to the recurrent cells."""
    key = name
    if kind == "rnn" and name in _RNN_ALIASES:
        key = _RNN_ALIASES[name]
    lookup = {k.lower(): k for k in NAMED}
    if key.lower() not in lookup:
        raise UserError(f"unknown architecture {_show(name)}; known names: {', '.join(list_genotypes(kind))}")
    genotype = NAMED[lookup[key.lower()]]
    if kind is not None and genotype.kind != kind:
        raise UserError(_kind_mismatch(f"architecture {_show(name)}", genotype.kind, kind))
    return genotype


_KIND_NAMES = {"cnn": "convolutional (CNN)", "rnn": "recurrent (RNN)"}


def _kind_mismatch(what: str, got: str, wanted: str) -> str:
    return f"{what} is a {_KIND_NAMES[got]} genotype, but this command needs a {_KIND_NAMES[wanted]} one"


def load_genotype(spec: str | os.PathLike[str] | AnyGenotype, kind: str | None = None) -> AnyGenotype:
    """Resolve an architecture given as a name, a JSON file, a run directory or a printed string.

    Args:
        spec: ``DARTS_V2``; ``path/genotype.json``; a run directory containing ``genotype.json``;
            ``Genotype(normal=[...], ...)``; or a JSON object string.
        kind: 'cnn' or 'rnn' to insist on one search space (a clear error otherwise).
    """
    if isinstance(spec, (Genotype, RecurrentGenotype)):
        genotype: AnyGenotype = spec
    else:
        text = str(spec).strip()
        if "\x00" in text:
            raise UserError("the architecture contains a null byte; pass a name, a genotype.json or a Genotype(...)")
        if not text:
            raise UserError("empty architecture; pass a name such as DARTS_V2, a genotype.json or a run directory")
        if text.startswith("Genotype"):
            genotype = parse_printed(text)
        elif text.startswith("{"):
            genotype = _from_json_text(text, "the architecture string")
        elif os.path.isdir(text):
            path = os.path.join(text, "genotype.json")
            if not os.path.isfile(path):
                raise UserError(f"{text} is a directory without genotype.json; pass a search run directory or a file")
            genotype = _read_file(path)
        elif os.path.isfile(text):
            genotype = _read_file(text)
        elif any(ch in text for ch in "/\\") or text.endswith((".json", ".txt")):
            raise UserError(f"genotype file {text} does not exist")
        else:
            return get_genotype(text, kind)
    if kind is not None and genotype.kind != kind:
        raise UserError(_kind_mismatch("the architecture", genotype.kind, kind))
    return genotype


def _from_json_text(text: str, where: str) -> AnyGenotype:
    if len(text) > MAX_TEXT:
        raise UserError(f"{where} is {len(text):,} characters long; a genotype is a few hundred")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:  # huge integers, absurd nesting
        raise UserError(f"{where} is not a genotype ({str(exc).splitlines()[0][:80]})") from None
    if isinstance(data, dict) and "genotype" in data and isinstance(data["genotype"], dict):
        data = data["genotype"]
    return from_dict(data)


def _read_file(path: str) -> AnyGenotype:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TEXT + 1)
        text = raw.decode("utf-8").strip()
    except OSError as exc:
        raise UserError(f"cannot read genotype file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"genotype file {path} is not UTF-8 text; expected genotype.json or a printed "
                        f"Genotype(...)") from None
    if len(raw) > MAX_TEXT:
        raise UserError(f"genotype file {path} is larger than {MAX_TEXT:,} bytes; it is not a genotype")
    if text.startswith("Genotype"):
        return parse_printed(text)
    try:
        return _from_json_text(text, path)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
