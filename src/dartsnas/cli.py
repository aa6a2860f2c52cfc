"""The ``dartsnas`` command line: ``dartsnas <command> [<target>] [flags]``.

All argument parsing lives here, driven by one table (:data:`COMMANDS`): a row per command names
its settings class and its handler by import path, so a command imports only its own settings
(torch-free, :mod:`dartsnas.settings`) to parse and show help, and only its own engine to run.
The flags of a command are added when that command is chosen, so ``dartsnas --help`` builds none.

Bad input raises :class:`UserError` or is an argparse error; both become one line
``dartsnas: error: ...`` with exit status 2, never a traceback or a usage dump. Why argparse rather
than jsonargparse: see :mod:`dartsnas.config`.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import logging
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from . import __version__
from .config import add_config_arguments
from .errors import UserError

Arg = tuple[tuple[str, ...], dict[str, Any]]


def arg(*names: str, **kwargs: Any) -> Arg:
    """One hand-written argument of a command (the settings class supplies the rest)."""
    return names, kwargs


CONFIG_FILE = arg("--config", metavar="FILE", help="YAML file (or shipped preset name) of settings; flags win")
RESUME = arg("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
GPU = arg("--gpu", type=int, metavar="N", help="GPU index, as in the authors' code (= --device cuda:N)")
ARCH = arg("arch", metavar="ARCH", help="a name (DARTS_V2), genotype.json, run directory or 'Genotype(...)'")
# Accepted for commands copied from the authors' test scripts; they do not affect testing.
AUTHORS_TEST_FLAGS = (arg("--seed", type=int, help=argparse.SUPPRESS),
                      arg("--cutout_length", type=int, help=argparse.SUPPRESS),
                      arg("--drop_path_prob", type=float, help=argparse.SUPPRESS),
                      arg("--report_freq", type=float, help=argparse.SUPPRESS),
                      arg("--cutout", action="store_true", help=argparse.SUPPRESS))
PLOT_FORMATS = ("svg", "png", "pdf", "dot")


@dataclass(frozen=True)
class Command:
    """One row of the command table: ``path`` is how it is typed (``"train cifar10"``)."""

    path: str
    help: str
    description: str
    handler: str  # "module:function", called with the parsed namespace
    settings: str | None = None  # "module:Class" whose fields become the flags
    args: tuple[Arg, ...] = ()
    extend: str | None = None  # "module:function(parser, target)" adding further flags


# Commands that take a target (``search cnn``, ``train cifar10``, ...), in the order --help lists them.
GROUPS: dict[str, str] = {
    "search": "search a cell (differentiable architecture search)",
    "train": "train an architecture from scratch",
    "test": "evaluate a trained checkpoint",
    "protocol": "search with several seeds, select the best cell, train it several times",
    "plot": "draw cells, search progress and learning curves",
    "data": "download the data sets",
}

_S = "dartsnas.settings."
_C = "dartsnas.commands:"
_V = "dartsnas.commands_viz:"
_TEST_CNN = ("Print the test error, loss, parameter count and speed of a trained {} network. Weights may be a "
             "dartsnas run's safetensors/checkpoint or the authors' released model file; nothing pickled is ever "
             "executed.")
_TEST_RNN = ("Print the validation and test perplexity of a trained recurrent model on {}. The model may be a "
             "dartsnas checkpoint or the authors' released whole-module file; pickled modules are read without "
             "executing any code.")
_PROTOCOL = ("The paper's evaluation protocol for {}: a search per seed, a short training of each derived cell scored "
             "on held-out training data, then several full trainings of the best cell, reported as mean +- std. "
             "Running the same command again resumes it.")

COMMANDS: tuple[Command, ...] = (
    Command("search cnn", "search a convolutional cell (CIFAR-10 by default)",
            "Search a convolutional cell with DARTS. Defaults are the paper's first-order setting; add --unrolled "
            "for second order.",
            _C + "search_cnn", _S + "search_cnn:SearchConfig", (CONFIG_FILE, RESUME)),
    Command("search rnn", "search a recurrent cell (Penn Treebank by default)",
            "Search a recurrent cell with DARTS on a word-level corpus. Defaults are the paper's first-order "
            "setting; add --unrolled for second order.",
            _C + "search_rnn", _S + "search_rnn:RNNSearchConfig", (CONFIG_FILE, RESUME)),
    Command("train cifar10", "train an architecture on CIFAR-10 from scratch",
            "Train a searched cell on CIFAR-10 from scratch. Defaults are the paper's: 20 cells, C=36, 600 epochs, "
            "batch 96, cosine learning rate from 0.025, auxiliary head, cutout, drop path 0.2.",
            _C + "train_cnn", _S + "train_cnn:CifarTrainConfig", (CONFIG_FILE, RESUME, GPU)),
    Command("train imagenet", "train an architecture on ImageNet (mobile setting)",
            "Train a searched cell on ImageNet (an ImageFolder tree with train/ and val/). Defaults are the "
            "paper's: 14 cells, C=48, 250 epochs, batch 128, learning rate 0.1 decayed by 0.97 per epoch, label "
            "smoothing 0.1, auxiliary head.",
            _C + "train_cnn", _S + "train_cnn:ImageNetTrainConfig", (CONFIG_FILE, RESUME, GPU)),
    Command("train ptb", "train a recurrent cell on Penn Treebank",
            "Train a recurrent cell from scratch on Penn Treebank with NT-ASGD. Defaults are the paper's PTB "
            "settings (850 units).",
            _C + "train_rnn", _S + "train_rnn:TrainConfig", (CONFIG_FILE, RESUME)),
    Command("train wt2", "train a recurrent cell on WikiText-2",
            "Train a recurrent cell from scratch on WikiText-2 with NT-ASGD. Defaults are the paper's WikiText-2 "
            "settings (700 units, dropouth 0.15, weight decay 5e-7).",
            _C + "train_rnn", _S + "train_rnn:TrainConfig", (CONFIG_FILE, RESUME)),
    Command("test cifar10", "test error of a trained CIFAR-10 network", _TEST_CNN.format("CIFAR-10"),
            _C + "test_cnn", _S + "evaluate_cnn:TestConfig", (GPU, *AUTHORS_TEST_FLAGS)),
    Command("test imagenet", "test error of a trained ImageNet network", _TEST_CNN.format("ImageNet"),
            _C + "test_cnn", _S + "evaluate_cnn:TestConfig", (GPU, *AUTHORS_TEST_FLAGS)),
    Command("test ptb", "validation and test perplexity of a recurrent model on Penn Treebank",
            _TEST_RNN.format("Penn Treebank"), _C + "test_rnn", _S + "evaluate_rnn:TestConfig"),
    Command("test wt2", "validation and test perplexity of a recurrent model on WikiText-2",
            _TEST_RNN.format("WikiText-2"), _C + "test_rnn", _S + "evaluate_rnn:TestConfig"),
    Command("protocol cnn", "convolutional cells on CIFAR-10", _PROTOCOL.format("convolutional cells on CIFAR-10"),
            _C + "protocol", "dartsnas.engine.protocol_settings:ProtocolOptions",
            (arg("--config", metavar="FILE", help="YAML file (or shipped preset) of protocol and stage settings; "
                                                  "flags win"),
             arg("--resume", metavar="PROTOCOL_DIR", help="continue a protocol with its stored settings")),
            extend="dartsnas.engine.protocol_cli:add_cli"),
    Command("protocol rnn", "recurrent cells on PTB", _PROTOCOL.format("recurrent cells on PTB"),
            _C + "protocol", "dartsnas.engine.protocol_settings:ProtocolOptions",
            (arg("--config", metavar="FILE", help="YAML file (or shipped preset) of protocol and stage settings; "
                                                  "flags win"),
             arg("--resume", metavar="PROTOCOL_DIR", help="continue a protocol with its stored settings")),
            extend="dartsnas.engine.protocol_cli:add_cli"),
    Command("select", "DARTS-PT: select the cell of a finished CNN search by perturbation",
            "Select the cell of a finished convolutional search by DARTS-PT (Wang et al., ICLR 2021): on each edge "
            "keep the operation whose removal costs the supernet the most validation accuracy, tune the supernet "
            "between decisions, then keep each node's two most important inputs. Writes RUN_DIR/genotype_pt.json "
            "(the search's genotype.json is kept) and its record in RUN_DIR/selection_pt; running the same command "
            "again continues an interrupted selection.",
            _C + "select", _S + "select_pt:SelectConfig",
            (arg("run_dir", metavar="RUN_DIR", help="the folder of a finished dartsnas search cnn run"),)),
    Command("info", "parameters and multiply-adds of an architecture",
            "Print the parameter count (and, for CNNs, the multiply-adds) of the CIFAR-10, ImageNet, PTB or "
            "WikiText-2 evaluation network built from an architecture.",
            _C + "info", _S + "evaluate_cnn:InfoConfig", (ARCH,)),
    Command("export", "write a trained network as ONNX, TorchScript or a torch.export program",
            "Write a trained network (the weights dartsnas test reads) as a file other runtimes load: ONNX, "
            "TorchScript or torch.export (.pt2). A CIFAR-10 or ImageNet network takes float32 images normalised as "
            "in training and returns plain logits; a PTB or WikiText-2 language model is written as one time step "
            "(tokens and hidden state in, logits and next hidden state out). The written file is loaded again and "
            "its outputs compared with PyTorch's. An existing file is never overwritten without --force.",
            _C + "export", _S + "export:ExportConfig",
            (arg("source", metavar="RUN_DIR|WEIGHTS", help="a training run directory or weights file"),)),
    Command("data download", "download CIFAR-10, Penn Treebank or WikiText-2 and verify their checksums",
            "Download a data set from its published source into the folder the commands read without --data (or "
            "--dir DIR), checking every file against its published checksum. Nothing is kept from a download "
            "that does not verify; files already there that verify are kept.",
            _C + "data_download", _S + "data:DownloadConfig",
            (arg("dataset", choices=("cifar10", "ptb", "wt2"), help="cifar10, ptb or wt2"),)),
    Command("genotypes", "list named architectures, print one, or draw a random one",
            "List named architectures, print one given as a name, file, run directory or genotype string, or draw "
            "a random cell from the search space (the baseline a search has to beat).",
            _C + "genotypes", None,
            (arg("action", nargs="?", choices=["list", "show", "random"], default="list",
                 help="list (default), show or random"),
             arg("spec", nargs="?", help="NAME | genotype.json | RUN_DIR | 'Genotype(...)'"),
             arg("--seed", type=int, default=0, help="random: the seed of the draw (default 0)"),
             arg("--kind", choices=["cnn", "rnn"], default="cnn", help="random: a convolutional or recurrent cell"),
             arg("--json", action="store_true", help="print JSON instead of the printed Genotype(...) form"))),
    Command("plot cell", "draw the cells of an architecture (Graphviz)",
            "Draw the normal and reduction cells (or the recurrent cell) of an architecture in the paper's style. "
            "Without the Graphviz 'dot' program the DOT source is written instead.",
            _V + "cell", None,
            (ARCH,
             arg("-o", "--output", metavar="FILE",
                 help="output path; per-cell suffixes are added (FILE_normal.svg, FILE_reduce.svg) unless --cell "
                      "picks one (default: NAME_<cell>.svg or cell_<cell>.svg here)"),
             arg("--format", choices=PLOT_FORMATS, help="file format (default: from -o, else svg)"),
             arg("--cell", choices=("normal", "reduce", "recurrent"), help="draw only this cell"))),
    Command("plot search", "animate a search run and plot its alphas and curves",
            "From a search run directory: a GIF per cell type of the most likely cell after each epoch, a figure "
            "of every edge's softmaxed alpha over the epochs, and the search's loss and accuracy curves.",
            _V + "search", None,
            (arg("run_dir", metavar="RUN_DIR", help="a search run directory"),
             arg("-o", "--output", metavar="DIR", help="output folder (default: RUN_DIR/figures)"))),
    Command("plot curves", "learning curves of one or more runs (mean and spread)",
            "Learning curves of one or more runs in one figure: each run thin, the mean bold, the spread over runs "
            "shaded.",
            _V + "curves", None,
            (arg("run_dirs", metavar="RUN_DIR", nargs="+", help="run directories with a metrics.jsonl"),
             arg("-o", "--output", metavar="FILE",
                 help="image file, .png/.svg/.pdf (default: RUN_DIR/figures/curves.png for one run, curves.png "
                      "here for several)"),
             arg("--metrics", metavar="KEYS",
                 help="comma-separated keys to draw, e.g. valid_acc,valid_loss (default: every per-epoch metric)"),
             arg("--spread", choices=("std", "range"), default="std",
                 help="shaded band: mean +- standard deviation, or min to max (default: std)"),
             arg("--title", help="figure title (default: the run names)"))),
    Command("report", "write a self-contained HTML report of a run",
            "Write one HTML page with the run's configuration, final numbers, cell diagrams, curves and search "
            "animation, every image embedded, ready to send to someone. The figures are also written to "
            "RUN_DIR/figures.",
            _V + "report", None,
            (arg("run_dir", metavar="RUN_DIR", help="a search or training run directory"),
             arg("-o", "--output", metavar="FILE", help="HTML file (default: RUN_DIR/report.html)"))),
)


def load(path: str) -> Any:
    """The object named by ``"module:name"``."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# -- help and errors ----------------------------------------------------------------------------


class HelpFormatter(argparse.HelpFormatter):
    """Each option once (its first spelling; switches as ``--x / --no-x``), choices shown, and
    descriptions that keep their line breaks."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=min(shutil.get_terminal_size().columns, 120))

    def _format_action_invocation(self, action: argparse.Action) -> str:
        names = getattr(action, "listed_names", None)
        if not names:
            return super()._format_action_invocation(action)
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{names[0]} / --no-{names[0][2:]}"
        return f"{names[0]} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, which refuses abbreviations, and which adds a
    command's flags only when that command is chosen (``populate``)."""

    def __init__(self, *args: Any, populate: Callable[[Parser], None] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _ready(self) -> None:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)

    def format_help(self) -> str:
        self._ready()
        return super().format_help()

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        self._ready()
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            # A command's parser is the one that knows its flags: say here what was meant.
            self.error(self._unknown(extras[0]))
        return namespace, extras

    def _unknown(self, token: str) -> str:
        if not token.startswith("-"):
            return f"unexpected argument {token!r}; see {self.prog} --help"
        flag = token.partition("=")[0]
        # Compared without the dashes, which every flag shares and which would make '--arch' look like '--lr'.
        known = {name.lstrip("-"): (name, action) for action in self._actions for name in action.option_strings
                 if action.help is not argparse.SUPPRESS}
        close = difflib.get_close_matches(flag.lstrip("-"), list(known), n=1, cutoff=0.6)
        hint = ""
        if close:
            name, action = known[close[0]]
            listed = getattr(action, "listed_names", None) or action.option_strings
            hint = f"; did you mean {name if name.startswith('--no-') else listed[0]}?"
        return f"unknown option {flag}{hint} (see {self.prog} --help)"

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is None or value in action.choices:
            return
        choices = ", ".join(map(str, action.choices))
        if isinstance(action, argparse._SubParsersAction):
            close = difflib.get_close_matches(str(value), list(action.choices), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise argparse.ArgumentError(action, f"unknown {action.dest} {value!r} for {self.prog}; choose from "
                                                 f"{choices}{hint}")
        name = (getattr(action, "listed_names", None) or action.option_strings or [action.metavar or action.dest])[0]
        raise argparse.ArgumentError(action, f"{name} must be one of {choices} (got {value!r})")

    def error(self, message: str) -> NoReturn:
        # argparse prefixes "argument --x/--y: "; our own messages name the argument themselves.
        message = re.sub(r"^argument ([^:/]+)(/[^:]*)?: (?=\1 |unknown )", "", message)
        message = re.sub(r"^argument ([^:/]+)(/[^:]*)?: expected one argument", r"\1 needs a value", message)
        required = re.match(r"the following arguments are required: (.*)", message)
        if required:
            subcommands = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            if subcommands:
                message = (f"{self.prog} needs a {subcommands[0].dest}: {', '.join(subcommands[0].choices)} "
                           f"(see {self.prog} --help)")
            else:
                message = f"{self.prog} needs {required.group(1)} (see {self.prog} --help)"
        print(f"dartsnas: error: {message}", file=sys.stderr)
        self.exit(2)


# -- the parser ---------------------------------------------------------------------------------


def _populate(command: Command) -> Callable[[Parser], None]:
    def populate(parser: Parser) -> None:
        for names, kwargs in command.args:
            parser.add_argument(*names, **kwargs)
        if command.settings:
            add_config_arguments(parser, load(command.settings))
        if command.extend:
            load(command.extend)(parser, command.path.split()[-1])
        positionals = [a for a in parser._actions if not a.option_strings]
        formatter = parser._get_formatter()
        words = [formatter._format_args(a, a.dest) for a in positionals]  # type: ignore[attr-defined]
        parser.usage = " ".join(["%(prog)s", *words, "[options]"])
        parser.set_defaults(handler=command.handler)
    return populate


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dartsnas",
                    description="DARTS: differentiable architecture search (Liu, Simonyan & Yang, ICLR 2019).")
    parser.add_argument("--version", action="version", version=f"dartsnas {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, Any] = {}
    for name, help_text in GROUPS.items():
        group = commands.add_parser(name, help=help_text, description=help_text)
        groups[name] = group.add_subparsers(dest="target", metavar="TARGET", required=True)
    for command in COMMANDS:
        group_name, _, target = command.path.partition(" ")
        where = groups[group_name] if target else commands
        where.add_parser(target or group_name, help=command.help, description=command.description,
                         populate=_populate(command))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int | None] = load(args.handler)
    # Under torchrun every process runs this command: only rank 0 prints results; every process
    # reports its errors, the others saying which one they are.
    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else "0"
    try:
        with contextlib.ExitStack() as stack:
            if rank != "0":
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            return int(handler(args) or 0)
    except UserError as exc:
        where = "" if rank == "0" else f"(rank {rank}) "
        print(f"dartsnas: error: {where}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("dartsnas").warning("interrupted")
        print("dartsnas: interrupted; a run can be continued with --resume RUN_DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
