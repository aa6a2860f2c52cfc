"""The protocol's settings: its own options, the two targets, and resolving them into a :class:`Protocol`.

A protocol is resolved from layers (engine defaults < paper defaults < ``--budget`` preset < YAML
file < flags) and stored in ``PROTOCOL_DIR/config.yaml``; resuming reads it back from there.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from ..config import check, coerce, field_name, field_names, load_yaml_mapping, option, short, to_dict
from ..errors import UserError
from ..rundir import RunDir

STAGES = ("search", "select", "final")
BUDGETS = ("paper", "tiny")


@dataclass
class ProtocolOptions:
    """Settings of the protocol itself; each stage's own settings live in its section."""

    seeds: int = option(4, "number of searches, one per seed (paper: 4)")
    seed: int = option(0, "first seed: searches use seed, seed+1, ...; every selection training uses seed (the "
                          "same data order for every candidate); final runs use seed, seed+1, ...")
    final_runs: int = option(10, "full trainings of the selected cell, reported as mean +- std (paper: 10)")
    budget: str = option("paper", "paper: the paper's settings; tiny: everything shrunk so that the whole protocol "
                                  "finishes in minutes on a CPU (for trying it out, not for results)", choices=BUDGETS)
    data: str | None = option(None, "cnn: CIFAR-10 folder or .npz; rnn: corpus folder (default: each command's)")
    test_data: str | None = option(None, "cnn: .npz of CIFAR-10 test images for the final runs (default: found "
                                         "next to --data, as train cifar10 does)")
    save: str | None = option(None, "protocol directory (default: runs/protocol-<target>-<hash of the settings>, "
                                    "so the same command finds its own directory again)")
    jobs: int = option(1, "stages run at once, one process per stage (one GPU each on CUDA); on the CPU each "
                          "process gets cores // jobs threads")
    device: str = option("auto", "auto, cpu or cuda")
    threads: int | None = option(None, "CPU threads per stage (default: cores // jobs)")
    download: bool = option(True, "cnn: download CIFAR-10 when it is missing and the network allows")

    def validate(self) -> None:
        check(self.seeds >= 1, f"--seeds must be at least 1, got {self.seeds}")
        check(self.final_runs >= 1, f"--final_runs must be at least 1, got {self.final_runs}")
        check(self.jobs >= 1, f"--jobs must be at least 1, got {self.jobs}")
        check(self.threads is None or self.threads >= 1, f"--threads must be at least 1, got {self.threads}")


# Settings that do not change any number the protocol produces: they may differ when it is resumed.
RUNTIME_OPTIONS = {"save", "jobs", "device", "threads", "download"}
RUNTIME_STAGE_OPTIONS = {"plots", "report_freq", "tensorboard", "workers"}


@dataclass(frozen=True)
class Target:
    """What the protocol needs to know about one search space (cnn or rnn)."""

    name: str
    search_module: str
    train_module: str
    search_class: str
    train_class: str
    # Stage settings the protocol sets itself (seed, run directory, data, ...): not user options.
    fixed: dict[str, frozenset[str]]
    # Paper settings of the stages that differ from the engines' own defaults.
    defaults: dict[str, dict[str, Any]]
    select_split: str  # what the selection score is measured on, in words
    select_metric: str  # a metrics.jsonl key of the selection runs
    select_higher_is_better: bool
    select_reduce: str  # "last": the last epoch's value; "best": the best epoch's
    search_metric: str
    test_metric: str  # label of the final number in the summary

    def engine(self, stage: str) -> tuple[str, str]:
        """(module, config class name) of the engine that runs a stage kind; names, so that stage
        processes can import them."""
        if stage == "search":
            return self.search_module, self.search_class
        return self.train_module, self.train_class

    def config_class(self, stage: str) -> type:
        # An engine's settings live, free of torch, in the module of the same name under dartsnas.settings.
        module, cls_name = self.engine(stage)
        return getattr(import_module("dartsnas.settings." + module.rsplit(".", 1)[-1]), cls_name)


_COMMON_FIXED = {"save", "seed", "data", "device", "threads"}
TARGETS: dict[str, Target] = {
    "cnn": Target(
        "cnn", "dartsnas.engine.search_cnn", "dartsnas.engine.train_cnn", "SearchConfig", "CifarTrainConfig",
        fixed={"search": frozenset(_COMMON_FIXED | {"dataset", "download"}),
               "select": frozenset(_COMMON_FIXED | {"arch", "test_data", "download"}),
               "final": frozenset(_COMMON_FIXED | {"arch", "test_data", "download"})},
        # Paper section 3.2: each candidate is trained for 100 epochs; 5,000 of the 50,000 training
        # images are held out to score it (the authors' code scored on the test set instead).
        defaults={"select": {"epochs": 100, "valid_size": 5000}},
        # The cosine schedule ends near zero, so the last epoch is the trained network; taking the
        # best epoch would add a max-of-noise bias that favours candidates with noisier curves.
        select_split="held-out training images", select_metric="valid_acc", select_higher_is_better=True, select_reduce="last",
        search_metric="valid_acc", test_metric="error (%)",
    ),
    "rnn": Target(
        "rnn", "dartsnas.engine.search_rnn", "dartsnas.engine.train_rnn", "RNNSearchConfig", "TrainConfig",
        fixed={"search": frozenset(_COMMON_FIXED),
               "select": frozenset(_COMMON_FIXED | {"arch", "dataset", "final_test"}),
               "final": frozenset(_COMMON_FIXED | {"arch", "dataset", "final_test"})},
        # Paper section 3.2: 300 epochs of training per candidate on PTB.
        defaults={"select": {"epochs": 300}},
        # The training run keeps its best-validation model (and averages weights late), so the best
        # epoch is the model it would hand on.
        select_split="the validation set", select_metric="valid_ppl", select_higher_is_better=False, select_reduce="best",
        search_metric="valid_ppl", test_metric="perplexity",
    ),
}


@dataclass
class Protocol:
    """A fully resolved protocol: its own options and the complete config of each stage kind."""

    target: Target
    options: ProtocolOptions
    stages: dict[str, Any]  # "search" / "select" / "final" -> that engine's config dataclass

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target.name, **to_dict(self.options)}
        for stage, cfg in self.stages.items():
            out[stage] = {k: v for k, v in to_dict(cfg).items() if k not in self.target.fixed[stage]}
        return out

    def comparable(self) -> dict[str, Any]:
        """The settings that decide the protocol's results (runtime options dropped)."""
        data = self.to_dict()
        for key in RUNTIME_OPTIONS:
            data.pop(key, None)
        for stage in STAGES:
            data[stage] = {k: v for k, v in data[stage].items() if k not in RUNTIME_STAGE_OPTIONS}
        return data

    def default_dir(self) -> Path:
        digest = hashlib.sha256(json.dumps(self.comparable(), sort_keys=True).encode()).hexdigest()[:8]
        budget = "" if self.options.budget == "paper" else f"-{self.options.budget}"
        return Path("runs") / f"protocol-{self.target.name}{budget}-{digest}"


# -- building a protocol from defaults, presets, YAML and flags -------------------------------------


def _merge(into: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    # One layer over another: a stage section is merged by option, everything else replaced.
    for key, value in values.items():
        if key in STAGES and isinstance(value, dict):
            into.setdefault(key, {}).update(value)
        else:
            into[key] = value
    return into


def _normalise(values: dict[str, Any], target: Target, where: str) -> dict[str, Any]:
    """Nest ``search.epochs``-style keys, accept dashes for underscores, reject unknown names."""
    names = field_names(ProtocolOptions)
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = field_name(key)
        stage, _, field = key.partition(".")
        if key in STAGES:
            if not isinstance(value, dict):
                raise UserError(f"{where}: {key!r} must map option names to values, e.g. '{key}: {{epochs: 10}}'")
            for sub, sub_value in value.items():
                out.setdefault(key, {})[field_name(sub)] = sub_value
        elif field and stage in STAGES:
            out.setdefault(stage, {})[field] = value
        elif key in names:
            out[key] = value
        else:
            raise UserError(f"{where}: unknown option {short(key)}; use protocol options (see --help) or a stage "
                            f"section: {', '.join(STAGES)}")
    for stage in STAGES:
        if stage not in out:
            continue
        cls = target.config_class(stage)
        fields = field_names(cls)
        for name in out[stage]:
            if name in target.fixed[stage]:
                raise UserError(f"{where}: {stage}.{name} is set by the protocol for every stage; use the "
                                f"protocol options instead (--seeds, --seed, --data, --device, --threads, ...)")
            if name not in fields:
                raise UserError(f"{where}: unknown option {stage}.{name}; see dartsnas protocol "
                                f"{target.name} --help")
        out[stage] = coerce(cls, out[stage], f"{where} ({stage})")
    own = {k: v for k, v in out.items() if k not in STAGES}
    out.update(coerce(ProtocolOptions, own, where))
    return out


def read_protocol_yaml(path: str | os.PathLike[str], target: Target) -> dict[str, Any]:
    """A YAML file (or shipped preset name) of protocol options with ``search:``/``select:``/``final:`` sections."""
    data, where = load_yaml_mapping(path, example="seeds: 4")
    return _normalise(data, target, where)


def make_protocol(target: str, overrides: dict[str, Any] | None = None, config_file: str | None = None) -> Protocol:
    """Resolve a protocol: engine defaults < paper defaults < ``--budget`` preset < YAML file < ``overrides``.

    ``overrides`` takes protocol options and stage options, the latter nested (``{"search": {"epochs":
    10}}``) or dotted (``{"search.epochs": 10}``).
    """
    if target not in TARGETS:
        raise UserError(f"unknown protocol target {target!r}; choose one of {', '.join(TARGETS)}")
    tgt = TARGETS[target]
    user: dict[str, Any] = {}
    if config_file:
        _merge(user, read_protocol_yaml(config_file, tgt))
    _merge(user, _normalise(overrides or {}, tgt, "options"))
    values: dict[str, Any] = {stage: dict(tgt.defaults.get(stage, {})) for stage in STAGES}
    budget = user.get("budget", "paper")
    if budget not in BUDGETS:
        raise UserError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    if budget != "paper":
        _merge(values, read_protocol_yaml(f"protocol-{target}-{budget}", tgt))
    _merge(values, user)
    options = ProtocolOptions(**{k: v for k, v in values.items() if k not in STAGES})
    options.validate()
    stages = {stage: tgt.config_class(stage)(**values[stage]) for stage in STAGES}
    return Protocol(tgt, options, stages)


def load_protocol(proto_dir: str | Path, runtime: dict[str, Any] | None = None, target: str | None = None
                  ) -> Protocol:
    """The protocol stored in ``proto_dir`` with runtime options (jobs, device, threads) replaced.

    ``target``, when given, is the target the caller expects (a clear error for the other one).
    """
    rd = RunDir(proto_dir)
    stored = rd.read_config()
    command = str(stored.get("command", ""))
    if not command.startswith("protocol-"):
        raise UserError(f"{proto_dir} is a {command!r} run, not a protocol directory")
    data = dict(stored["config"])
    stored_target = data.pop("target")
    if target is not None and stored_target != target:
        raise UserError(f"{proto_dir} holds a {stored_target} protocol; resume it with dartsnas protocol "
                        f"{stored_target}")
    for key, value in (runtime or {}).items():
        if key not in RUNTIME_OPTIONS:
            raise UserError(f"--{key} cannot change when resuming {proto_dir}; start a new protocol to change it")
        data[key] = value
    data["save"] = str(proto_dir)
    return make_protocol(stored_target, data)
