"""Does the search beat chance? A resumable study: search cells with several methods and seeds, retrain
every derived cell, random cells and a fixed reference cell with identical settings, and compare.

    python benchmarks/study/study.py run benchmarks/study/cpu.yaml [--dir DIR] [--hours H] [--only GROUP,...]
    python benchmarks/study/study.py status benchmarks/study/cpu.yaml [--dir DIR]
    python benchmarks/study/study.py summary benchmarks/study/cpu.yaml [--dir DIR] [--earlier SUMMARY_JSON]

The plan (a YAML file, see cpu.yaml) names the data, the settings shared by every search and every
retraining, the search groups (each a set of `dartsnas search cnn` options), the seeds, the number of
random cells and the fixed reference cells. Every stage is an ordinary run directory under the study
directory, run by the same engines as `dartsnas search cnn` and `dartsnas train cifar10` (through the
protocol's stage runner, so a killed stage resumes from its last epoch); `manifest.json` records which
stages are done and how long each ran. Run the same command again to continue.

`summary` reads every number back from the stage directories and writes summary.json, summary.md and
a strip plot (figures need matplotlib). A study may run in sittings on different machines: a cell that
has no result in this directory takes it from the summary.json of an earlier sitting of the same plan
(`--earlier`), whose stage directories need not exist any more; the merged summary says which cells
came from where. The comparison of each searched group with the random cells is
an exact two-sided permutation test on the per-cell mean test accuracy: under the null hypothesis that
the search is no better than drawing a cell at random, the group labels of the cells are exchangeable.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dartsnas.config import coerce, field_names, load_yaml_mapping
from dartsnas.engine.protocol_executors import prepare_stage_dir, run_stage
from dartsnas.engine.protocol_manifest import Manifest
from dartsnas.engine.protocol_summary import last_record, mean_std, read_genotype
from dartsnas.errors import UserError
from dartsnas.genotype import Genotype, load_genotype, random_genotype
from dartsnas.rundir import RunDir, write_json, write_text
from dartsnas.search.diagnostics import PARAMETER_FREE, count_ops
from dartsnas.settings.search_cnn import SearchConfig
from dartsnas.settings.train_cnn import CifarTrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from side_by_side import cpu_description  # the benchmarks share one CPU description

SEARCH = ("dartsnas.engine.search_cnn", "SearchConfig")
TRAIN = ("dartsnas.engine.train_cnn", "CifarTrainConfig")
# Set by the study for every stage; a plan may not set them.
FIXED = {"save", "seed", "data", "test_data", "dataset", "arch", "device", "threads", "download", "valid_size",
         "image_size"}
RANDOM = "random"


@dataclass
class Plan:
    """A study: what to search, what to retrain, on which data, with which seeds."""

    train_data: str
    test_data: str | None  # None: the test batch of the CIFAR-10 folder train_data
    search_seeds: list[int]
    train_seeds: list[int]
    random_cells: int
    random_seed: int
    fixed_cells: list[str]
    search: dict[str, Any]
    train: dict[str, Any]
    groups: dict[str, dict[str, Any]]
    threads: int = 2
    device: str = "cpu"
    # Images resized to image_size x image_size (searches and retrainings alike) through an image folder
    # the study writes from the .npz files; None: the images as they are.
    image_size: int | None = None
    source: str = ""
    overrides: list[str] = field(default_factory=list)

    def digest(self) -> str:
        """What decides the study's numbers (not where the plan file lies, nor device and threads)."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("source", "overrides", "device",
                                                                               "threads")}
        # The data by name: the same files may lie elsewhere on another machine.
        data.update(train_data=Path(self.train_data).name, test_data=self.test_data and Path(self.test_data).name)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def names(self) -> list[str]:
        return [*self.groups, RANDOM, *self.fixed_cells] if self.random_cells else [*self.groups, *self.fixed_cells]


def _data_path(text: str) -> str:
    # Environment variables let one plan serve every machine; DARTSNAS_DATA defaults, as in the tests,
    # to ../shared/data next to the repository.
    root = os.environ.get("DARTSNAS_DATA", str(Path(__file__).resolve().parents[3] / "shared" / "data"))
    return os.path.expandvars(text.replace("${DARTSNAS_DATA}", root))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` on a plan: ``search.epochs=2``, ``groups.first-order.unrolled=true``,
    ``search_seeds=[0]`` (values are YAML)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set search.epochs=2")
        *path, last = key.split(".", 2 if key.startswith("groups.") else 1)
        node = data
        for part in path:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        try:
            node[last] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML") from None
    return data


def load_plan(path: str, overrides: list[str] | None = None) -> Plan:
    data, where = load_yaml_mapping(path, example="search_seeds: [0, 1, 2]")
    data = apply_overrides(data, overrides or [])
    known = {"data", "search_seeds", "train_seeds", "random_cells", "random_seed", "fixed_cells", "search", "train",
             "groups", "threads", "device"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; a plan has {', '.join(sorted(known))}")
    for key in ("data", "groups", "search", "train"):
        if not isinstance(data.get(key), dict):
            raise UserError(f"{where}: {key!r} must be a mapping")

    def options(cls: type, values: dict[str, Any], what: str) -> dict[str, Any]:
        names = field_names(cls)
        for name in values:
            if name in FIXED:
                raise UserError(f"{where}: {what}.{name} is set by the study for every stage")
            if name not in names:
                raise UserError(f"{where}: {what}.{name} is not an option of this command")
        return coerce(cls, values, f"{where} ({what})")

    groups = {}
    for name, values in data["groups"].items():
        if name in (RANDOM, *data.get("fixed_cells", [])) or "/" in name:
            raise UserError(f"{where}: {name!r} cannot name a search group")
        groups[name] = options(SearchConfig, dict(values or {}), f"groups.{name}")
    plan = Plan(
        train_data=_data_path(str(data["data"].get("train", ""))),
        test_data=_data_path(str(data["data"].get("test") or "")) or None,
        search_seeds=[int(s) for s in data.get("search_seeds", [0, 1, 2])],
        train_seeds=[int(s) for s in data.get("train_seeds", [0])],
        random_cells=int(data.get("random_cells", 6)),
        random_seed=int(data.get("random_seed", 1000)),
        fixed_cells=[str(c) for c in data.get("fixed_cells", [])],
        search=options(SearchConfig, data["search"], "search"),
        train=options(CifarTrainConfig, data["train"], "train"),
        groups=groups, threads=int(data.get("threads", 2)), device=str(data.get("device", "cpu")),
        image_size=int(data["data"]["image_size"]) if data["data"].get("image_size") else None,
        source=str(Path(path).resolve()), overrides=list(overrides or []))
    for cell in plan.fixed_cells:
        load_genotype(cell, kind="cnn")  # a clear error now rather than after hours of searching
    for f in (plan.train_data, plan.test_data):
        if f and not os.path.exists(f):
            raise UserError(f"{where}: data {f} does not exist (set the environment variable it names, "
                            "or edit data.train/test)")
    if plan.image_size is not None and not (plan.test_data and plan.train_data.endswith(".npz")):
        raise UserError(f"{where}: data.image_size needs data.train and data.test as .npz files")
    if not plan.train_data or (not plan.test_data and os.path.isfile(plan.train_data)):
        raise UserError(f"{where}: data.train must name a CIFAR-10 folder, or a training .npz with data.test "
                        "naming the test .npz")
    return plan


# -- the stages -----------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str  # also its directory under the study directory
    group: str
    cell: str  # search/<group>/seed-<s>, random/cell-<k> or the fixed cell's name
    kind: str  # search / train
    config: dict[str, Any]
    deps: tuple[str, ...] = field(default_factory=tuple)


def _search_data(plan: Plan, study: Path) -> dict[str, Any]:
    if plan.image_size is None:
        return {"dataset": "cifar10", "data": plan.train_data}
    # A search reads only train/ of the folder (never val/, the test images).
    return {"dataset": "folder", "data": str(study / "data"), "image_size": plan.image_size}


def _train_data(plan: Plan, study: Path) -> dict[str, Any]:
    if plan.image_size is None:
        return {"data": plan.train_data, "test_data": plan.test_data}
    return {"dataset": "folder", "data": str(study / "data"), "image_size": plan.image_size, "test_data": None}


def prepare_data(plan: Plan, study: Path) -> None:
    """With ``image_size``: ``STUDY/data/train/<class>/`` and ``val/<class>/`` as lossless PNGs of the
    .npz images (the runs resize them as they read them), written once, under a temporary name first."""
    folder = study / "data"
    if plan.image_size is None or folder.is_dir():
        return
    from PIL import Image

    tmp = study / "data.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    for split, path in (("train", plan.train_data), ("val", plan.test_data)):
        with np.load(path, allow_pickle=False) as arrays:
            x, y = arrays["x"], arrays["y"]
            names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
        for i, (image, label) in enumerate(zip(x, y)):
            name = names[int(label)] if names else f"class-{int(label)}"
            target = tmp / split / name
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(target / f"{i:06d}.png")
    tmp.rename(folder)


def stages(plan: Plan, study: Path) -> list[Stage]:
    """Searches first (their retrainings need them), then every retraining; in launch order."""
    out: list[Stage] = []
    runtime = {"device": plan.device, "threads": plan.threads, "download": False}
    cells: list[tuple[str, str, str, tuple[str, ...]]] = []  # group, cell id, arch, deps
    for group, options in plan.groups.items():
        for seed in plan.search_seeds:
            name = f"search/{group}/seed-{seed}"
            cfg = {**plan.search, **options, **runtime, **_search_data(plan, study), "seed": seed,
                   "save": str(study / name)}
            out.append(Stage(name, group, name, "search", cfg))
            cells.append((group, name, str(study / name), (name,)))
    for k in range(plan.random_cells):
        cell = random_genotype(plan.random_seed + k, kind="cnn")
        cells.append((RANDOM, f"random/cell-{k}", repr(cell), ()))
    for name in plan.fixed_cells:
        cells.append((name, name, name, ()))
    for group, cell, arch, deps in cells:
        for seed in plan.train_seeds:
            name = f"train/{cell}/run-{seed}"
            cfg = {**plan.train, **runtime, **_train_data(plan, study), "valid_size": 0, "arch": arch, "seed": seed,
                   "save": str(study / name)}
            out.append(Stage(name, group, cell, "train", cfg, deps))
    return out


def _manifest(plan: Plan, study: Path) -> Manifest:
    return Manifest.load_or_create(study / "manifest.json", "study", {"plan": plan.source, "digest": plan.digest(),
                                                                       "overrides": plan.overrides})


def _entry(manifest: Manifest, stage: Stage) -> dict[str, Any]:
    return manifest.stages.setdefault(stage.name, {"kind": stage.kind, "status": "pending", "attempts": 0,
                                                   "seconds": 0.0})


def run(plan: Plan, study: Path, hours: float | None, only: set[str] | None) -> int:
    """Run every pending stage in order until all are done or ``hours`` have passed; returns failures."""
    study.mkdir(parents=True, exist_ok=True)
    rd = RunDir(study)
    rd.lock()
    try:
        manifest = _manifest(plan, study)
        if manifest.data["config"].get("digest") != plan.digest():
            raise UserError(f"{study} was run with other plan settings (--set {manifest.data['config'].get('overrides')}"
                            f" on {manifest.data['config'].get('plan')}); run it with those, or choose another --dir")
        prepare_data(plan, study)
        started, failures = time.perf_counter(), 0
        for stage in stages(plan, study):
            entry = _entry(manifest, stage)
            if entry["status"] == "done" or (only and stage.group not in only):
                continue
            if hours is not None and time.perf_counter() - started > hours * 3600:
                print(f"study: {hours} h budget used; run the same command again to continue", flush=True)
                break
            if not all(manifest.is_done(d) for d in stage.deps):
                continue
            resume = prepare_stage_dir(study / stage.name)
            entry.update(status="running", attempts=entry["attempts"] + 1, threads=plan.threads)
            manifest.save()
            print(f"study: {'resuming' if resume else 'starting'} {stage.name}", flush=True)
            t0 = time.perf_counter()
            try:
                run_stage(*(SEARCH if stage.kind == "search" else TRAIN), stage.config, resume)
                entry["status"] = "done"
            except (Exception, KeyboardInterrupt) as exc:
                entry["status"] = "failed"
                entry["error"] = (str(exc).splitlines() or [type(exc).__name__])[0]
                failures += 1
                if isinstance(exc, KeyboardInterrupt):
                    raise
            finally:
                entry["seconds"] += time.perf_counter() - t0
                manifest.save()
        return failures
    finally:
        rd.unlock()


# -- the summary ----------------------------------------------------------------------------------


def permutation_test(a: list[float], b: list[float]) -> float:
    """Exact two-sided p-value of the difference of means, over every split of the pooled values
    into groups of the original sizes (a permutation test; no normality assumed)."""
    pooled = a + b
    n, total_sum = len(a), math.fsum(pooled)
    # Enumerate the smaller group's members; its sum fixes both means.
    k = min(n, len(b))
    size_other = len(pooled) - k

    def difference(chosen_sum: float) -> float:
        return abs(chosen_sum / k - (total_sum - chosen_sum) / size_other)

    observed = abs(statistics.fmean(a) - statistics.fmean(b))
    total = hits = 0
    for idx in itertools.combinations(pooled, k):
        total += 1
        hits += difference(math.fsum(idx)) >= observed - 1e-12
    return hits / total


def compare_with_random(cells: list[float], random_cells: list[float]) -> dict[str, Any]:
    """Mean difference of ``cells`` against the random cells and the permutation test's p-value."""
    n, m = len(cells), len(random_cells)
    p = permutation_test(cells, random_cells)
    # Only the observed split reaches the largest |difference|, and with equal group sizes
    # also its mirror image (the groups swapped).
    return {"difference": statistics.fmean(cells) - statistics.fmean(random_cells), "p_value": p,
            "significant_at_0.05": p < 0.05, "smallest_possible_p": (2 if n == m else 1) / math.comb(n + m, n)}


def pooled_comparison(searched_groups: list[list[float]], random_cells: list[float]) -> dict[str, Any] | None:
    """Every searched cell of every group against the random cells, or None with fewer than two groups.

    More cells, so a smaller difference can show; and one test instead of one per group: with a test per
    group, some p < 0.05 becomes likely by chance alone as groups are added."""
    searched = [v for cells in searched_groups for v in cells]
    if len(searched_groups) < 2 or len(searched) < 2 or len(random_cells) < 2:
        return None
    return {"cells": len(searched), "mean": statistics.fmean(searched), **compare_with_random(searched, random_cells)}


def _cell_record(study: Path, plan: Plan, group: str, cell: str, manifest: Manifest) -> dict[str, Any]:
    if cell.startswith("search/"):
        genotype = read_genotype(study / cell) if (study / cell / "genotype.json").is_file() else None
    elif cell.startswith("random/"):
        genotype = random_genotype(plan.random_seed + int(cell.rsplit("-", 1)[1]), kind="cnn")
    else:
        genotype = load_genotype(cell, kind="cnn")
    accs, train_accs = [], []
    for seed in plan.train_seeds:
        name = f"train/{cell}/run-{seed}"
        if manifest.is_done(name):
            acc = last_record(study / name, "test_acc")
            if acc is not None and math.isfinite(acc):
                accs.append(acc)
                train_accs.append(last_record(study / name, "train_acc"))
    rec: dict[str, Any] = {"group": group, "cell": cell, "test_acc": accs,
                           "mean_test_acc": statistics.fmean(accs) if accs else None,
                           # The last epoch's running training accuracy: tells a cell that fits its
                           # data slowly (too few epochs) from one that overfits.
                           "train_acc": train_accs}
    if isinstance(genotype, Genotype):
        rec.update(genotype=repr(genotype), skip_normal=count_ops(genotype.normal, ["skip_connect"]),
                   skip_reduce=count_ops(genotype.reduce, ["skip_connect"]),
                   param_free_normal=count_ops(genotype.normal, PARAMETER_FREE),
                   parameters=_parameters(plan, genotype))
    if cell.startswith("search/") and manifest.is_done(cell):
        entry = manifest.stage(cell)
        rec["search_cpu_minutes"] = entry["seconds"] * entry.get("threads", plan.threads) / 60
        rec["search_valid_acc"] = last_record(study / cell, "valid_acc")
        records = RunDir(study / cell).read_metrics()
        rec["search_epochs"] = len(records)
        stop = [r["stopped"] for r in records if "stopped" in r]
        if stop:
            rec["early_stop"] = stop[-1]
    return rec


def _parameters(plan: Plan, genotype: Genotype) -> int:
    """Weights of the retrained network of ``genotype`` (without an auxiliary head): the same for every
    image size, since the network ends in global pooling."""
    from dartsnas.api import create_model
    from dartsnas.models.cnn import count_network_parameters

    defaults = CifarTrainConfig()
    model = create_model(genotype, "cifar10", num_classes=10,
                         init_channels=plan.train.get("init_channels", defaults.init_channels),
                         layers=plan.train.get("layers", defaults.layers))
    return count_network_parameters(model)


def _shown(path: str) -> str:
    """A file as the repository names it, so that a committed summary holds no path of one machine."""
    resolved, root = Path(path).resolve(), Path(__file__).resolve().parents[2]
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else path


def load_earlier(plan: Plan, paths: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Summaries that earlier sittings of the same plan wrote (their stage directories may be gone, on
    another machine or deleted): each must come from a plan with the same digest. A summary written
    before summaries recorded the digest is accepted when it names the same plan file and overrides."""
    out = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"--earlier {path}: cannot read it as a study summary ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
            raise UserError(f"--earlier {path}: not a study summary (no list of cells); give a summary.json "
                            "that `study.py summary` wrote")
        digest = data.get("plan_digest")
        same = (digest == plan.digest() if digest is not None else
                Path(str(data.get("plan", ""))).name == Path(plan.source).name
                and data.get("overrides", []) == plan.overrides)
        if not same:
            raise UserError(f"--earlier {path}: it was written for other plan settings ({data.get('plan')}, "
                            f"--set {data.get('overrides')}); only a summary of this plan can be merged")
        out.append((_shown(path), data))
    return out


def summarize(plan: Plan, study: Path, earlier: list[tuple[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Every number read back from the stage directories; a cell without a result here takes its record
    from the first of the ``earlier`` summaries (see load_earlier) that has one, marked with its source."""
    manifest = _manifest(plan, study)
    cells: dict[str, dict[str, Any]] = {}
    for stage in stages(plan, study):
        if stage.kind == "train" and stage.cell not in cells:
            cells[stage.cell] = _cell_record(study, plan, stage.group, stage.cell, manifest)
    imported: dict[str, int] = {}
    for source, data in earlier or []:
        for rec in data["cells"]:
            here = cells.get(rec.get("cell"))
            if here is not None and here["mean_test_acc"] is None and rec.get("mean_test_acc") is not None \
                    and rec.get("group") == here["group"]:
                cells[rec["cell"]] = {**rec, "from": source}
                imported[source] = imported.get(source, 0) + 1
    groups: dict[str, Any] = {}
    for name in plan.names():
        members = [c for c in cells.values() if c["group"] == name]
        accs = [a for c in members for a in c["test_acc"]]
        per_cell = [c["mean_test_acc"] for c in members if c["mean_test_acc"] is not None]
        g: dict[str, Any] = {"test_acc": mean_std(accs), "cells": len(per_cell), "cells_planned": len(members),
                             "per_cell": per_cell}
        skips = [c["skip_normal"] for c in members if "skip_normal" in c and (c["mean_test_acc"] is not None)]
        g["skip_normal"] = mean_std([float(s) for s in skips])
        trained = [c for c in members if c["mean_test_acc"] is not None]
        g["parameters"] = mean_std([float(c["parameters"]) for c in trained if "parameters" in c])
        g["train_acc"] = mean_std([a for c in trained for a in c["train_acc"] if a is not None])
        cost = [c["search_cpu_minutes"] for c in members if "search_cpu_minutes" in c]
        if cost:
            g["search_cpu_minutes"] = mean_std(cost)
        groups[name] = g
    random_cells = groups.get(RANDOM, {}).get("per_cell", [])
    for name in plan.groups:
        g = groups[name]
        if len(g["per_cell"]) >= 2 and len(random_cells) >= 2:
            g["vs_random"] = compare_with_random(g["per_cell"], random_cells)
    extra: dict[str, Any] = {}
    pooled = pooled_comparison([groups[name]["per_cell"] for name in plan.groups], random_cells)
    if pooled:
        extra["searched_vs_random"] = pooled
    sized = [c for c in cells.values() if c["mean_test_acc"] is not None and "parameters" in c]
    if len(sized) >= 3:
        # Over every retrained cell: does accuracy at this training length follow network size?
        extra["spearman_test_acc_vs_parameters"] = spearman([c["parameters"] for c in sized],
                                                            [c["mean_test_acc"] for c in sized])
    done = sum(1 for s in manifest.stages.values() if s["status"] == "done")
    cpu_minutes = sum(s["seconds"] * s.get("threads", plan.threads) for s in manifest.stages.values()) / 60
    sittings = []
    for source, data in earlier or []:
        if imported.get(source):
            # Its searches and trainings count as done stages; its CPU time counts whole (it was spent).
            taken = [c for c in cells.values() if c.get("from") == source]
            done += sum(len(c["test_acc"]) + ("search_cpu_minutes" in c) for c in taken)
            cpu_minutes += data.get("cpu_minutes_total", 0.0)
            sittings.append({"summary": source, "cells": imported[source],
                             "cpu_minutes_total": data.get("cpu_minutes_total"), "machine": data.get("machine")})
    if sittings:
        extra["earlier_sittings"] = sittings
    return {"plan": _shown(plan.source), "plan_digest": plan.digest(), "stages_done": done, "stages": len(stages(plan, study)),
            "overrides": plan.overrides, "cpu_minutes_total": cpu_minutes,
            # CPU-minutes are only comparable on one machine: say which one this sitting's were taken on.
            "machine": {k: v for k, v in cpu_description().items() if k in ("cpu", "cpu_flags", "cores",
                                                                              "torch_cpu_capability", "torch")},
            "groups": groups, **extra, "cells": list(cells.values())}


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the ranks (None when either is constant)."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


def _fmt(stat: dict[str, Any], digits: int = 2) -> str:
    if not stat or stat.get("n", 0) == 0:
        return "-"
    std = "" if stat["std"] is None else f" ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{std}"


def _thousands(stat: dict[str, Any]) -> dict[str, Any]:
    if not stat or stat.get("n", 0) == 0:
        return stat
    return {**stat, "mean": stat["mean"] / 1000, "std": None if stat["std"] is None else stat["std"] / 1000}


def _machine_line(machine: dict[str, str] | None) -> str:
    if not machine:
        return "a machine the summary did not record"
    return (f"{machine.get('cpu')}, {machine.get('cores')} cores (flags {machine.get('cpu_flags')}; PyTorch "
            f"{machine.get('torch')} kernels {machine.get('torch_cpu_capability')})")


def write_outputs(summary: dict[str, Any], study: Path) -> None:
    write_json(study / "summary.json", summary)
    lines = [(f"{summary['stages_done']} of {summary['stages']} stages done; "
             f"{summary['cpu_minutes_total']:.0f} CPU-minutes in all."), "",
             ("| group | test acc (%) mean ± std | trainings | cells | skip connections (normal cell) | "
              "parameters (k) | final train acc (%) | search CPU-min | vs random: difference, p |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for name, g in summary["groups"].items():
        vs = g.get("vs_random")
        cmp = f"{vs['difference']:+.2f}, p = {vs['p_value']:.3f}" if vs else "-"
        lines.append(f"| {name} | {_fmt(g['test_acc'])} | {g['test_acc']['n']} | {g['cells']}/{g['cells_planned']} | "
                     f"{_fmt(g['skip_normal'], 1)} | {_fmt(_thousands(g.get('parameters', {})), 0)} | "
                     f"{_fmt(g.get('train_acc', {}), 1)} | {_fmt(g.get('search_cpu_minutes', {}), 1)} | {cmp} |")
    lines += ["", f"CPU time measured on: {_machine_line(summary.get('machine'))}."]
    for sitting in summary.get("earlier_sittings", []):
        lines += ["", (f"{sitting['cells']} cells taken from an earlier sitting's summary, {sitting['summary']} "
                      f"({sitting['cpu_minutes_total']:.0f} CPU-minutes, counted in the total; measured on "
                      f"{_machine_line(sitting.get('machine'))}).")]
    pooled = summary.get("searched_vs_random")
    if pooled:
        lines += ["", (f"All {pooled['cells']} searched cells together against the random cells: "
                      f"{pooled['mean']:.2f} %, difference {pooled['difference']:+.2f}, p = {pooled['p_value']:.3f} "
                      f"(smallest possible {pooled['smallest_possible_p']:.2g}).")]
    rho = summary.get("spearman_test_acc_vs_parameters")
    if rho is not None:
        lines += ["", (f"Spearman rank correlation of test accuracy with the retrained network's parameters, over "
                      f"all {sum(1 for c in summary['cells'] if c['mean_test_acc'] is not None)} retrained cells: "
                      f"{rho:+.2f}.")]
    write_text(study / "summary.md", "\n".join(lines) + "\n")
    try:
        from dartsnas.viz.plotting import new_figure, save_figure
    except ImportError:
        print("study: matplotlib is not installed; the strip plot was skipped", flush=True)
        return
    # Only groups with a result: a plot of a partly run study shows what exists.
    names = [n for n, g in summary["groups"].items() if g["per_cell"]]
    if not names:
        return
    fig = new_figure(figsize=(1.2 * len(names) + 2, 3.8))
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        ys = summary["groups"][name]["per_cell"]
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(ys)), ys, s=18)
        ax.hlines(statistics.fmean(ys), i - 0.3, i + 0.3, colors="k", linewidth=1)
    if RANDOM in names:
        ax.axhline(statistics.fmean(summary["groups"][RANDOM]["per_cell"]), color="0.6", linestyle="--",
                   linewidth=0.8, zorder=0)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("one point per cell (mean over its training seeds); bar: group mean; dashed: random cells' mean",
                 fontsize=9)
    save_figure(fig, study / "cells.png", dpi=120)


def status(plan: Plan, study: Path) -> str:
    manifest = _manifest(plan, study)
    lines = []
    for stage in stages(plan, study):
        entry = manifest.stages.get(stage.name, {"status": "pending", "seconds": 0.0})
        lines.append(f"{entry['status']:8s} {entry['seconds'] / 60:7.1f} min  {stage.name}"
                     + (f"  ({entry['error']})" if entry.get("error") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("run", "status", "summary"))
    parser.add_argument("plan", help="the study's YAML plan, e.g. benchmarks/study/cpu.yaml")
    parser.add_argument("--dir", help="study directory (default: runs/study-<plan name>)")
    parser.add_argument("--hours", type=float, help="run: start no stage after this many hours")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change the plan, e.g. --set search.epochs=2 --set search_seeds=[0] (a study directory "
                             "keeps the --set options it was started with)")
    parser.add_argument("--earlier", action="append", default=[], metavar="SUMMARY_JSON",
                        help="take the result of every cell that has none in --dir from this summary.json of an "
                             "earlier sitting of the same plan (its stage directories may be gone); repeatable")
    parser.add_argument("--only", help="run: only these groups (comma-separated; random, a fixed cell or a group)")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.plan, args.set)
        earlier = load_earlier(plan, args.earlier)
        study = Path(args.dir or Path("runs") / f"study-{Path(args.plan).stem}")
        if args.action == "run":
            only = set(args.only.split(",")) if args.only else None
            if only and not only <= set(plan.names()):
                raise UserError(f"--only: unknown group(s) {sorted(only - set(plan.names()))}; "
                                f"the plan has {', '.join(plan.names())}")
            failures = run(plan, study, args.hours, only)
            write_outputs(summarize(plan, study, earlier), study)
            print((study / "summary.md").read_text(), end="")
            return 1 if failures else 0
        if args.action == "status":
            print(status(plan, study))
            return 0
        write_outputs(summarize(plan, study, earlier), study)
        print((study / "summary.md").read_text(), end="")
        return 0
    except UserError as exc:
        print(f"study: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
