"""``dartsnas protocol cnn|rnn``: the paper's whole evaluation protocol in one resumable command.

DARTS lands in a different local minimum on every seed, so the paper (section 3.2) searches with
several seeds, trains every derived cell briefly from scratch, keeps the cell with the best
validation score and reports the mean of several full trainings of it. Here each of those runs is
an ordinary run directory under one protocol directory::

    PROTOCOL_DIR/
      config.yaml  manifest.json  log.txt
      data/train.npz            (cnn) the training images only: searches and selection read this file
      search/seed-S/            one search per seed
      select/seed-S/            the cell of search S trained briefly, scored on held-out training images
      final/run-R/              the selected cell trained in full (seed + R), tested once at the end
      genotype.json             the selected cell
      summary.md  summary.json  report.html

``manifest.json`` records which stage is done. Running the same command again resumes: finished
stages are skipped and an unfinished one continues from its last epoch checkpoint through its own
engine's resume, so an interrupted protocol loses at most the epoch in progress.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np

from ..config import (
    _base_type,
    _parse_value,
    add_config_arguments,
    check,
    coerce,
    explicit_args,
    load_yaml_mapping,
    option,
    to_dict,
)
from ..errors import UserError
from ..rundir import RunDir, atomic_write
from ..utils import default_threads
from .protocol_summary import Manifest, best_record, last_record, mean_std, read_genotype, write_summary

logger = logging.getLogger("dartsnas")

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

    def config_class(self, stage: str) -> type:
        module = import_module(self.search_module if stage == "search" else self.train_module)
        return getattr(module, self.search_class if stage == "search" else self.train_class)


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
    for key, value in values.items():
        if key in STAGES and isinstance(value, dict):
            into.setdefault(key, {}).update(value)
        else:
            into[key] = value
    return into


def _normalise(values: dict[str, Any], target: Target, where: str) -> dict[str, Any]:
    """Nest ``search.epochs``-style keys, accept dashes for underscores, reject unknown names."""
    names = {f.name for f in dataclasses.fields(ProtocolOptions)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        stage, _, field = key.partition(".")
        if key in STAGES:
            if not isinstance(value, dict):
                raise UserError(f"{where}: {key!r} must map option names to values, e.g. '{key}: {{epochs: 10}}'")
            for sub, sub_value in value.items():
                out.setdefault(key, {})[str(sub).replace("-", "_")] = sub_value
        elif field and stage in STAGES:
            out.setdefault(stage, {})[field] = value
        elif key in names:
            out[key] = value
        else:
            raise UserError(f"{where}: unknown option {key!r}; use protocol options (see --help) or a stage "
                            f"section: {', '.join(STAGES)}")
    for stage in STAGES:
        if stage not in out:
            continue
        cls = target.config_class(stage)
        fields = {f.name for f in dataclasses.fields(cls)}
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


# -- stages -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str  # also its directory under the protocol directory
    kind: str  # search / select / final
    seed: int
    index: int  # search seed's position (search, select) or run number (final)
    deps: tuple[str, ...]


def plan(protocol: Protocol) -> list[Stage]:
    """Every stage in the order it is launched; a select stage needs only its own search."""
    opts = protocol.options
    seeds = [opts.seed + i for i in range(opts.seeds)]
    stages = [Stage(f"search/seed-{s}", "search", s, i, ()) for i, s in enumerate(seeds)]
    stages += [Stage(f"select/seed-{s}", "select", opts.seed, i, (f"search/seed-{s}",)) for i, s in enumerate(seeds)]
    selects = tuple(f"select/seed-{s}" for s in seeds)
    stages += [Stage(f"final/run-{r}", "final", opts.seed + r, r, selects) for r in range(opts.final_runs)]
    return stages


def search_seed(stage: Stage, protocol: Protocol) -> int:
    return protocol.options.seed + stage.index


@dataclass
class _Context:
    protocol: Protocol
    proto_dir: Path
    train_file: Path | None  # cnn: the training images only, read by searches and selection runs
    train_images: int | None


def stage_config(stage: Stage, ctx: _Context, selected: str | None, device: str, threads: int) -> Any:
    """The engine config of one stage: the stage kind's settings plus what the protocol fixes."""
    protocol, tgt = ctx.protocol, ctx.protocol.target
    cfg = protocol.stages[stage.kind]
    fixed: dict[str, Any] = {"save": str((ctx.proto_dir / stage.name).resolve()), "seed": stage.seed,
                             "device": device, "threads": threads}
    opts = protocol.options
    if tgt.name == "cnn":
        fixed["download"] = opts.download
        if stage.kind == "search":
            fixed.update(dataset="cifar10", data=str(ctx.train_file))
        elif stage.kind == "select":
            # Reading a file that holds no test images is what guarantees that selection cannot see them.
            fixed.update(data=str(ctx.train_file), test_data=None)
        else:
            fixed.update(data=opts.data, test_data=opts.test_data)
    else:
        if opts.data is not None:
            fixed["data"] = opts.data
        if stage.kind != "search":
            fixed.update(dataset="ptb", final_test=stage.kind == "final")
    if stage.kind == "select":
        fixed["arch"] = str((ctx.proto_dir / f"search/seed-{search_seed(stage, protocol)}").resolve())
    elif stage.kind == "final":
        assert selected is not None
        fixed["arch"] = str((ctx.proto_dir / selected).resolve())
    return dataclasses.replace(cfg, **fixed)


def stage_splits(stage: Stage, ctx: _Context) -> dict[str, Any]:
    """Which images (tokens) a stage trains on, which it scores on, and whether it sees the test set."""
    cfg = ctx.protocol.stages[stage.kind]
    if ctx.protocol.target.name == "rnn":
        # The vocabulary spans all three files (facts section 4), but only final runs evaluate test.txt.
        data = ctx.protocol.options.data or "data/penn"
        if stage.kind == "search":
            return {"data": data, "weights": "train.txt", "alpha": "valid.txt", "test": False}
        return {"data": data, "train": "train.txt", "selection" if stage.kind == "select" else "model choice":
                "valid.txt", "test": stage.kind == "final"}
    n = ctx.train_images or 0
    if stage.kind == "search":
        n_w = int(np.floor(cfg.train_portion * n))
        return {"data": "data/train.npz", "weights": f"{n_w} training images", "alpha": f"{n - n_w} training images",
                "test": False}
    held = f"{cfg.valid_size} held-out training images" if cfg.valid_size else "none"
    if stage.kind == "select":
        return {"data": "data/train.npz", "train": f"{n - cfg.valid_size} training images", "selection": held,
                "test": False}
    return {"data": ctx.protocol.options.data or "CIFAR-10 folder", "train": f"{n - cfg.valid_size} training images",
            "held-out": held, "test": True}


def _watch_parent(parent: int) -> None:
    # A stage process whose protocol process was killed must not keep writing its run directory
    # while the user starts the protocol again. (Its parent is the protocol process, or the fork
    # server, which exits with the protocol process.)
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def run_stage(module: str, cls_name: str, config: dict[str, Any], resume: bool, in_process: bool = True,
              on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> None:
    """Run (or resume) one stage with its own engine; also the entry point of stage processes."""
    if not in_process:
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    engine = import_module(module)
    cfg = getattr(engine, cls_name)(**config)
    # The engines use the given config when resuming if its run directory is the one resumed; that
    # lets runtime settings (threads, device) follow this invocation.
    engine.run(cfg, resume=cfg.save if resume else None, on_epoch_end=on_epoch_end)


class _InProcessExecutor:
    """``--jobs 1``: stages run one after the other in this process (no start-up cost per stage)."""

    def __init__(self, on_epoch_end: Callable[[str, int, dict[str, Any]], None] | None):
        self.on_epoch_end = on_epoch_end

    def submit(self, stage: Stage, *args: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        hook = None
        if self.on_epoch_end is not None:
            hook = functools.partial(self.on_epoch_end, stage.name)
        try:
            run_stage(*args, in_process=True, on_epoch_end=hook)
            future.set_result(None)
        except Exception as exc:  # noqa: BLE001 - handed to the scheduler like a failed stage process
            future.set_exception(exc)
        return future

    def shutdown(self) -> None:
        pass


class _ProcessExecutor:
    """``--jobs N``: one fresh process per stage, at most N at a time."""

    def __init__(self, jobs: int, modules: list[str]):
        # Never plain fork: the protocol process may hold torch thread pools or CUDA state. A fork
        # server that has imported the engines (but run nothing) starts each stage in well under a
        # second, where a fresh interpreter spends seconds importing torch.
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(modules)
        else:
            context = multiprocessing.get_context("spawn")
        self.pool = cf.ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1)

    def submit(self, stage: Stage, *args: Any) -> cf.Future:
        return self.pool.submit(run_stage, *args, in_process=False)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)


# -- the protocol -----------------------------------------------------------------------------


@dataclass
class ProtocolResult:
    run_dir: Path
    summary: dict[str, Any]


@contextlib.contextmanager
def _lock(proto_dir: Path) -> Iterator[None]:
    """One protocol process per directory: a second one would run the same stages twice."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the user is trusted
        yield
        return
    with open(proto_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another protocol process is running in {proto_dir}; wait for it or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _note(rd: RunDir, message: str, *args: Any) -> None:
    # The protocol's log lines go to its own log.txt; handlers are attached only around each line
    # because in-process stages attach their own handlers to the same logger while they run.
    with rd.logging():
        logger.info(message, *args)


def _prepare_training_file(protocol: Protocol, proto_dir: Path, manifest: Manifest) -> tuple[Path, int]:
    """``data/train.npz``: the CIFAR-10 training images alone, the only data searches and selection read."""
    path = (proto_dir / "data" / "train.npz").resolve()
    info = manifest.data.get("data")
    if path.is_file() and info:
        return path, int(info["train_images"])
    from ..data.images import load_image_data

    data = load_image_data("cifar10", protocol.options.data, download=protocol.options.download)
    x = data.train.x.permute(0, 2, 3, 1).contiguous().numpy()
    y = data.train.y.numpy()
    atomic_write(path, lambda f: np.savez(f, x=x, y=y))
    manifest.data["data"] = {"source": protocol.options.data, "train_file": "data/train.npz",
                             "train_images": len(y)}
    manifest.save()
    return path, len(y)


def _select(protocol: Protocol, proto_dir: Path) -> dict[str, Any]:
    """Score every candidate from its selection run directory and pick the best (first on ties)."""
    tgt = protocol.target
    best: dict[str, Any] | None = None
    for stage in plan(protocol):
        if stage.kind != "select":
            continue
        score = selection_score(proto_dir / stage.name, tgt)
        better = best is None or (score > best["score"] if tgt.select_higher_is_better else score < best["score"])
        if better:
            best = {"stage": stage.name, "search": f"search/seed-{search_seed(stage, protocol)}",
                    "seed": search_seed(stage, protocol), "metric": tgt.select_metric, "score": score}
    assert best is not None
    return best


def selection_score(run_dir: Path, target: Target) -> float:
    if target.select_reduce == "last":
        score = last_record(run_dir, target.select_metric)
    else:
        score = best_record(run_dir, target.select_metric, target.select_higher_is_better)
    if score is None:
        raise UserError(f"{run_dir} reports no {target.select_metric} (the held-out score); the selection training "
                        f"needs a held-out split (select.valid_size > 0)")
    return score


def final_test_numbers(run_dir: Path, target: Target) -> tuple[float | None, float | None]:
    """(test number reported in the summary, test accuracy or None) of a final run."""
    if target.name == "cnn":
        acc = last_record(run_dir, "test_acc")
        return (None if acc is None else 100.0 - acc), acc
    test = run_dir / "test.json"
    if not test.is_file():
        return None, None
    value = json.loads(test.read_text(encoding="utf-8")).get("test_ppl")
    return (float(value) if value is not None else None), None


def build_summary(protocol: Protocol, proto_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """Everything ``summary.md`` shows, read from the stage run directories."""
    tgt = protocol.target
    selection = _select(protocol, proto_dir)
    stages = plan(protocol)
    candidates = []
    for stage in stages:
        if stage.kind != "search":
            continue
        genotype = read_genotype(proto_dir / stage.name)
        select_dir = f"select/seed-{stage.seed}"
        candidates.append({
            "seed": stage.seed, "search_dir": stage.name, "select_dir": select_dir,
            "genotype": genotype.to_dict(), "genotype_text": str(genotype),
            "search_score": last_record(proto_dir / stage.name, tgt.search_metric),
            "selection_score": selection_score(proto_dir / select_dir, tgt),
            "selected": stage.name == selection["search"],
        })
    runs, tests, accs = [], [], []
    for stage in stages:
        if stage.kind != "final":
            continue
        test, acc = final_test_numbers(proto_dir / stage.name, tgt)
        runs.append({"run": stage.index, "seed": stage.seed, "dir": stage.name, "test": test, "test_accuracy": acc})
        tests.append(test)
        accs.append(acc)
    final: dict[str, Any] = {"runs": runs, "test": mean_std(tests)}
    if tgt.name == "cnn":
        final["test_accuracy"] = mean_std(accs)
    compute_stages = {s.name: {"seconds": manifest.stage(s.name)["seconds"],
                               "attempts": manifest.stage(s.name)["attempts"]} for s in stages}
    per_kind = {kind: sum(v["seconds"] for k, v in compute_stages.items() if k.startswith(kind + "/"))
                for kind in STAGES}
    return {
        "target": tgt.name, "search_metric": tgt.search_metric, "test_metric": tgt.test_metric,
        "test_lower_is_better": True,
        "candidates": candidates,
        "selection": {**selection, "split": tgt.select_split, "higher_is_better": tgt.select_higher_is_better,
                      "reduce": tgt.select_reduce},
        "final": final,
        "splits": {s.name: manifest.stage(s.name)["splits"] for s in stages},
        # Kept last and apart: the only entries that differ between two runs of the same protocol.
        "compute": {"stages": compute_stages, "per_kind": per_kind, "total": sum(per_kind.values())},
    }


def run(protocol: Protocol, on_epoch_end: Callable[[str, int, dict[str, Any]], None] | None = None
        ) -> ProtocolResult:
    """Run (or resume) the whole protocol; returns its directory and summary.

    Args:
        protocol: from :func:`make_protocol` or :func:`load_protocol`.
        on_epoch_end: with ``jobs == 1``, called as ``on_epoch_end(stage_name, epoch, record)`` after
            each epoch of each stage (stages in separate processes cannot call back).
    """
    proto_dir = Path(protocol.options.save) if protocol.options.save else protocol.default_dir()
    protocol = dataclasses.replace(protocol, options=dataclasses.replace(protocol.options, save=str(proto_dir)))
    try:
        proto_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create protocol directory {proto_dir}: {exc.strerror}") from None
    with _lock(proto_dir):
        return _run(protocol, proto_dir, on_epoch_end)


def _run(protocol: Protocol, proto_dir: Path, on_epoch_end: Callable[[str, int, dict[str, Any]], None] | None
         ) -> ProtocolResult:
    rd = RunDir(proto_dir)
    command = f"protocol-{protocol.target.name}"
    manifest = Manifest.load_or_create(proto_dir / "manifest.json", command, protocol.comparable())
    if rd.config.is_file():
        stored = load_protocol(proto_dir, {}).comparable()
        if stored != protocol.comparable():
            changed = sorted(_differences(stored, protocol.comparable()))
            raise UserError(f"{proto_dir} holds a protocol with other settings ({', '.join(changed[:4])}); "
                            f"run it with its own settings (--resume {proto_dir}) or choose another --save")
        _note(rd, "resuming the protocol in %s", proto_dir)
    else:
        rd.write_config(protocol.to_dict(), command)
        _note(rd, "protocol %s in %s: %d searches, %d final runs", protocol.target.name, proto_dir,
              protocol.options.seeds, protocol.options.final_runs)
    manifest.save()

    train_file, n_train = (None, None)
    if protocol.target.name == "cnn":
        train_file, n_train = _prepare_training_file(protocol, proto_dir, manifest)
    ctx = _Context(protocol, proto_dir, train_file, n_train)
    stages = plan(protocol)
    for stage in stages:
        entry = manifest.stages.setdefault(stage.name, {"kind": stage.kind, "seed": stage.seed, "status": "pending",
                                                        "attempts": 0, "seconds": 0.0})
        entry["splits"] = stage_splits(stage, ctx)
    manifest.save()
    _schedule(stages, ctx, manifest, rd, on_epoch_end)

    summary = build_summary(protocol, proto_dir, manifest)
    write_summary(proto_dir, summary)
    selected = manifest.data["selection"]
    shutil.copyfile(proto_dir / selected["search"] / "genotype.json", proto_dir / "genotype.json")
    final = summary["final"]["test"]
    if final["n"] == 0:
        _note(rd, "warning: no final run reported a test number; for cnn pass --test_data FILE.npz when the "
                  "test images do not lie next to --data")
    _note(rd, "selected the cell of search seed %d (%s %.4f); test %s over %d runs: %s +- %s", selected["seed"],
          selected["metric"], selected["score"], protocol.target.test_metric, final["n"], final["mean"], final["std"])
    from .common import write_figures

    write_figures(proto_dir)
    return ProtocolResult(proto_dir, summary)


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            yield from _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            yield f"{prefix}{key}: {va!r} -> {vb!r}"


def _devices(protocol: Protocol) -> tuple[list[str], int]:
    """One device name per job slot, and the CPU threads of each stage process."""
    opts = protocol.options
    from ..utils import resolve_device

    device = resolve_device(opts.device)
    threads = opts.threads or max(1, default_threads() // opts.jobs)
    if device.type == "cuda" and device.index is None:
        import torch

        count = max(1, torch.cuda.device_count())
        return [f"cuda:{i % count}" for i in range(opts.jobs)], threads
    return [opts.device] * opts.jobs, threads


def _schedule(stages: list[Stage], ctx: _Context, manifest: Manifest, rd: RunDir,
              on_epoch_end: Callable[[str, int, dict[str, Any]], None] | None) -> None:
    """Launch every stage whose inputs are done, at most ``jobs`` at a time, until all are done."""
    protocol, proto_dir = ctx.protocol, ctx.proto_dir
    tgt = protocol.target
    devices, threads = _devices(protocol)
    jobs = protocol.options.jobs
    executor = (_InProcessExecutor(on_epoch_end) if jobs == 1
                else _ProcessExecutor(jobs, [__name__, tgt.search_module, tgt.train_module]))
    pending = [s for s in stages if not manifest.is_done(s.name)]
    running: dict[cf.Future, tuple[Stage, int, float]] = {}
    free = list(range(jobs))
    failure: BaseException | None = None
    try:
        while pending or running:
            if manifest.data.get("selection") is None and all(
                    manifest.is_done(s.name) for s in stages if s.kind == "select"):
                manifest.data["selection"] = _select(protocol, proto_dir)
                manifest.save()
                sel = manifest.data["selection"]
                _note(rd, "selection: the cell of %s scores best (%s %.4f)", sel["search"], sel["metric"],
                      sel["score"])
            if failure is None:
                for stage in list(pending):
                    if not free:
                        break
                    if not all(manifest.is_done(d) for d in stage.deps):
                        continue
                    selected = manifest.data.get("selection") or {}
                    slot = free.pop(0)
                    cfg = stage_config(stage, ctx, selected.get("search"), devices[slot], threads)
                    stage_dir = proto_dir / stage.name
                    resume = (stage_dir / "checkpoints" / "last.pt").is_file()
                    if not resume and stage_dir.exists():
                        # Killed before its first checkpoint: nothing in it can be resumed.
                        shutil.rmtree(stage_dir)
                    entry = manifest.stage(stage.name)
                    entry.update(status="running", attempts=entry["attempts"] + 1, dir=stage.name)
                    manifest.save()
                    _note(rd, "%s %s (attempt %d)", "resuming" if resume else "starting", stage.name,
                          entry["attempts"])
                    module = tgt.search_module if stage.kind == "search" else tgt.train_module
                    cls_name = tgt.search_class if stage.kind == "search" else tgt.train_class
                    pending.remove(stage)
                    started = time.perf_counter()
                    future = executor.submit(stage, module, cls_name, to_dict(cfg), resume)
                    running[future] = (stage, slot, started)
            if not running:
                if pending and failure is None:
                    raise RuntimeError(f"no stage can start: {[s.name for s in pending]}")
                break
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                stage, slot, started = running.pop(future)
                free.append(slot)
                entry = manifest.stage(stage.name)
                entry["seconds"] += time.perf_counter() - started
                error = future.exception()
                if error is None:
                    entry["status"] = "done"
                    _note(rd, "%s done (%.1f s)", stage.name, entry["seconds"])
                else:
                    entry["status"] = "failed"
                    entry["error"] = str(error).splitlines()[0] if str(error) else type(error).__name__
                    if failure is None:
                        failure = error
                        if running:
                            _note(rd, "%s failed; waiting for %d running stage(s) to finish", stage.name,
                                  len(running))
                manifest.save()
    finally:
        executor.shutdown()
    if failure is not None:
        raise failure


# -- command line -------------------------------------------------------------------------------


def _stage_flags(parser: argparse.ArgumentParser, target: Target) -> None:
    """``--search.epochs`` (also ``--search-epochs``) for every setting of every stage kind.

    They are accepted without being listed one by one: each stage takes the options of its own
    command, whose --help lists them, so the protocol's help sums each stage up in one line.
    """
    for stage in STAGES:
        add_config_arguments(parser, target.config_class(stage), prefix=stage, defaults=target.defaults.get(stage),
                             skip=target.fixed[stage], listed=False)


def cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol options and dotted stage options given on the command line."""
    given = explicit_args(ProtocolOptions, args)
    given.update({k: v for k, v in vars(args).items() if "." in k and k.partition(".")[0] in STAGES})
    return given


# The command whose options each stage takes, per target.
_STAGE_COMMANDS = {"cnn": {"search": "search cnn", "select": "train cifar10", "final": "train cifar10"},
                   "rnn": {"search": "search rnn", "select": "train ptb", "final": "train ptb"}}
_STAGE_ROLES = {"search": "every search", "select": "every selection training (short, scored on held-out data)",
                "final": "every final training of the selected cell"}


def add_cli(parser: argparse.ArgumentParser, target_name: str) -> None:
    """The stage flags of ``dartsnas protocol TARGET`` and the help section that sums them up."""
    target = TARGETS[target_name]
    _stage_flags(parser, target)
    lines = []
    for stage in STAGES:
        changed = ", ".join(f"{k} {v}" for k, v in target.defaults.get(stage, {}).items())
        lines.append(f"--{stage}.NAME VALUE: {_STAGE_ROLES[stage]}; NAME is any option of 'dartsnas "
                     f"{_STAGE_COMMANDS[target_name][stage]}' except {', '.join(sorted(target.fixed[stage]))}"
                     + (f" (protocol defaults: {changed})" if changed else ""))
    lines.append(f"Switches: --no-{STAGES[0]}.NAME. A --config YAML file may hold {', '.join(s + ':' for s in STAGES)} "
                 f"sections.")
    parser.add_argument_group("stage settings", "\n".join(lines))
