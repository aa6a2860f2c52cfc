"""The search -> selection -> final-training protocol on the shared CIFAR-10 sample.

Every protocol here is tiny (3 cells, C = 2, two steps per stage) so that a whole protocol runs in a
few seconds on one CPU thread; what is checked is the bookkeeping: stage directories, manifest,
resume after a kill, selection, splits and the summary.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from dartsnas.cli import build_parser
from dartsnas.engine import protocol as proto
from dartsnas.errors import UserError
from dartsnas.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DARTSNAS_DATA", REPO.parent / "shared" / "data"))
TRAIN_NPZ = DATA_DIR / "cifar10" / "cifar10_train_first4000_exact.npz"

_NET = {"init_channels": 2, "layers": 3, "batch_size": 16, "max_steps": 2, "plots": False}
# The tiny budget with even smaller networks; "2 seeds, 1 epoch each, 2 final runs".
TINY = {
    "budget": "tiny", "seeds": 2, "final_runs": 2, "threads": 1, "device": "cpu",
    "search": {**_NET, "epochs": 1, "eval_batches": 1},
    "select": {**_NET, "epochs": 1, "eval_batches": 2, "valid_size": 64},
    "final": {**_NET, "epochs": 1, "eval_batches": 2},
}
STAGE_NAMES = ["search/seed-0", "search/seed-1", "select/seed-0", "select/seed-1", "final/run-0", "final/run-1"]


def _settings(save: Path, **changes) -> dict:
    return {**TINY, "data": str(TRAIN_NPZ), "save": str(save), **changes}


def _without_compute(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "compute"}


@pytest.fixture(scope="module")
def full_protocol(tmp_path_factory) -> proto.ProtocolResult:
    """One uninterrupted tiny protocol, shared by the tests that only read it."""
    if not TRAIN_NPZ.is_file():
        pytest.skip(f"{TRAIN_NPZ} not found (set DARTSNAS_DATA)")
    save = tmp_path_factory.mktemp("protocol") / "full"
    return proto.run(proto.make_protocol("cnn", _settings(save)))


def test_tiny_protocol_end_to_end(full_protocol):
    root, summary = full_protocol.run_dir, full_protocol.summary
    manifest = json.loads((root / "manifest.json").read_text())
    assert sorted(manifest["stages"]) == sorted(STAGE_NAMES)
    for name in STAGE_NAMES:
        assert manifest["stages"][name]["status"] == "done"
        assert manifest["stages"][name]["attempts"] == 1
        assert (root / name / "checkpoints" / "last.pt").is_file()
        assert (root / name / "config.yaml").is_file()
    for name in ("summary.md", "summary.json", "genotype.json", "config.yaml", "report.html"):
        assert (root / name).is_file(), name
    assert "Protocol summary" in (root / "report.html").read_text()

    # Every number of the summary is the one in the stage run directories.
    assert json.loads((root / "summary.json").read_text()) == summary
    for cand in summary["candidates"]:
        search, select = RunDir(root / cand["search_dir"]), RunDir(root / cand["select_dir"])
        assert cand["genotype"] == json.loads(search.genotype.read_text())
        assert cand["search_score"] == search.read_metrics()[-1]["valid_acc"]
        assert cand["selection_score"] == select.read_metrics()[-1]["valid_acc"]
        # The selection run trained the cell its search found.
        assert json.loads(select.genotype.read_text()) == cand["genotype"]
    errors = []
    for run in summary["final"]["runs"]:
        record = RunDir(root / run["dir"]).read_metrics()[-1]
        assert run["test"] == pytest.approx(100.0 - record["test_acc"])
        assert run["test_accuracy"] == record["test_acc"]
        errors.append(100.0 - record["test_acc"])
    stats = summary["final"]["test"]
    assert stats["n"] == 2
    assert stats["mean"] == pytest.approx(statistics.fmean(errors))
    assert stats["std"] == pytest.approx(statistics.stdev(errors))
    assert [r["seed"] for r in summary["final"]["runs"]] == [0, 1]
    assert set(summary["compute"]["stages"]) == set(STAGE_NAMES)
    assert all(v["seconds"] > 0 for v in summary["compute"]["stages"].values())
    text = (root / "summary.md").read_text()
    assert f"{stats['mean']:.2f} ± {stats['std']:.2f}" in text
    for cand in summary["candidates"]:
        assert cand["genotype_text"] in text

    # Selection picks the candidate with the best held-out accuracy (the first on a tie).
    scores = {c["seed"]: c["selection_score"] for c in summary["candidates"]}
    best = max(scores, key=lambda s: (scores[s], -s))
    assert summary["selection"]["seed"] == best
    assert [c["seed"] for c in summary["candidates"] if c["selected"]] == [best]
    chosen = json.loads((root / f"search/seed-{best}/genotype.json").read_text())
    assert json.loads((root / "genotype.json").read_text()) == chosen
    for run in summary["final"]["runs"]:
        assert json.loads(RunDir(root / run["dir"]).genotype.read_text()) == chosen


def test_selection_never_sees_test_data(full_protocol, cifar_test_npz):
    root = full_protocol.run_dir
    manifest = json.loads((root / "manifest.json").read_text())
    train_file = (root / "data" / "train.npz").resolve()
    # The file searches and selection read holds the training images and nothing else.
    with np.load(train_file) as f, np.load(TRAIN_NPZ) as original:
        assert sorted(f.files) == ["x", "y"]
        np.testing.assert_array_equal(f["x"], original["x"])
    with np.load(cifar_test_npz) as test:
        n_test = len(test["y"])
    for name in STAGE_NAMES:
        config = RunDir(root / name).read_config()["config"]
        splits = manifest["stages"][name]["splits"]
        keys = {k for record in RunDir(root / name).read_metrics() for k in record}
        if name.startswith(("search/", "select/")):
            assert config["data"] == str(train_file)
            assert config.get("test_data") is None
            assert splits["test"] is False
            assert not any(k.startswith("test_") for k in keys), name
            assert not any(p.name.startswith("test") for p in (root / name).iterdir())
        else:
            assert splits["test"] is True and "test_acc" in keys
    for name in ("select/seed-0", "select/seed-1"):
        config = RunDir(root / name).read_config()["config"]
        assert config["valid_size"] == 64 and "valid_acc" in RunDir(root / name).read_metrics()[-1]
        assert manifest["stages"][name]["splits"]["selection"] == "64 held-out training images"
    assert full_protocol.summary["selection"]["metric"] == "valid_acc"
    assert n_test > 0  # the shared test sample exists, so the final runs had something to find


def test_killed_protocol_resumes_without_rerunning_finished_stages(full_protocol, tmp_path):
    save = tmp_path / "killed"
    config = tmp_path / "protocol.yaml"
    settings = _settings(save)
    config.write_text(yaml.safe_dump({k: v for k, v in settings.items() if k != "save"}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dartsnas", "protocol", "cnn", "--config", str(config), "--save", str(save)]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest_path = save / "manifest.json"
    done: list[str] = []
    deadline = time.monotonic() + 90
    try:
        while not done and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            if manifest_path.is_file():
                stages = json.loads(manifest_path.read_text())["stages"]
                done = [n for n, s in stages.items() if s["status"] == "done"]
    finally:
        process.kill()
        _, err = process.communicate()
    assert done, f"no stage finished before the protocol ended: {err.decode()[-2000:]}"
    stages = json.loads(manifest_path.read_text())["stages"]
    done = [n for n, s in stages.items() if s["status"] == "done"]
    assert len(done) < len(STAGE_NAMES), "the protocol finished before it could be killed"
    stamps = {n: (save / n / "checkpoints" / "last.pt").stat().st_mtime_ns for n in done}

    # The same settings again (here through the Python API): it finds its directory and resumes.
    result = proto.run(proto.make_protocol("cnn", settings))
    manifest = json.loads(manifest_path.read_text())
    for name in done:
        assert (save / name / "checkpoints" / "last.pt").stat().st_mtime_ns == stamps[name], name
        assert manifest["stages"][name]["attempts"] == 1, name
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert _without_compute(result.summary) == _without_compute(full_protocol.summary)
    full_md = (full_protocol.run_dir / "summary.md").read_text()
    resumed_md = (save / "summary.md").read_text()
    assert resumed_md.split("## Compute")[0] == full_md.split("## Compute")[0]

    # A finished protocol run again does nothing and rewrites the same summary.
    again = proto.run(proto.make_protocol("cnn", settings))
    assert _without_compute(again.summary) == _without_compute(result.summary)
    assert json.loads(manifest_path.read_text())["stages"] == manifest["stages"]


def test_stage_interrupted_after_its_checkpoint_is_resumed_by_its_engine(tmp_path):
    if not TRAIN_NPZ.is_file():
        pytest.skip(f"{TRAIN_NPZ} not found (set DARTSNAS_DATA)")
    settings = _settings(tmp_path / "p", seeds=1, final_runs=1)

    def interrupt(stage: str, epoch: int, record: dict) -> None:
        if stage == "select/seed-0":
            raise KeyboardInterrupt  # as if killed right after the stage's checkpoint was written

    with pytest.raises(KeyboardInterrupt):
        proto.run(proto.make_protocol("cnn", settings), on_epoch_end=interrupt)
    stage = tmp_path / "p" / "select" / "seed-0"
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["stages"]["select/seed-0"]["status"] == "running"
    stamp = (stage / "checkpoints" / "last.pt").stat().st_mtime_ns
    metrics = (stage / "metrics.jsonl").read_text()

    result = proto.run(proto.make_protocol("cnn", settings))
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["stages"]["select/seed-0"]["attempts"] == 2
    assert (stage / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp
    assert (stage / "metrics.jsonl").read_text() == metrics
    assert "already finished" in (stage / "log.txt").read_text()
    assert result.summary["selection"]["seed"] == 0 and result.summary["final"]["test"]["n"] == 1
    assert result.summary["final"]["test"]["std"] is None  # one run has no spread
    assert "n/a (one run)" in (tmp_path / "p" / "summary.md").read_text()


def test_settings_come_from_defaults_presets_yaml_and_flags(tmp_path):
    paper = proto.make_protocol("cnn")
    # The paper's protocol (section 3.2) is the default, and the shipped paper preset says the same.
    assert (paper.options.seeds, paper.options.final_runs) == (4, 10)
    assert (paper.stages["search"].epochs, paper.stages["select"].epochs, paper.stages["final"].epochs) == (50, 100, 600)
    assert paper.stages["select"].valid_size > 0 and paper.stages["final"].valid_size == 0
    assert proto.make_protocol("cnn", config_file="protocol-cnn-paper").to_dict() == paper.to_dict()
    assert proto.make_protocol("rnn").stages["select"].epochs == 300

    tiny = proto.make_protocol("cnn", {"budget": "tiny"})
    assert tiny.options.seeds == 2 and tiny.stages["search"].epochs == 1 and tiny.stages["final"].max_steps

    config = tmp_path / "p.yaml"
    config.write_text("budget: tiny\nseeds: 3\nsearch:\n  epochs: 4\n  init-channels: 6\nselect.epochs: 7\n")
    args = build_parser().parse_args(["protocol", "cnn", "--config", str(config), "--search.epochs", "5",
                                      "--select-learning-rate", "0.1", "--no-final.cutout", "--final-runs", "3", "--jobs", "2"])
    given = proto.cli_settings(args)
    p = proto.make_protocol("cnn", given, args.config)
    assert (p.options.seeds, p.options.final_runs, p.options.jobs) == (3, 3, 2)
    assert p.stages["search"].epochs == 5 and p.stages["search"].init_channels == 6  # flag > YAML > preset
    assert p.stages["select"].epochs == 7 and p.stages["select"].learning_rate == 0.1
    assert p.stages["final"].cutout is False and p.stages["final"].epochs == 1
    # Runtime options do not change the protocol's identity (its default directory); settings do.
    assert p.default_dir() == proto.make_protocol("cnn", {**given, "jobs": 1}, args.config).default_dir()
    assert p.default_dir() != proto.make_protocol("cnn", {**given, "seeds": 4}, args.config).default_dir()

    with pytest.raises(UserError, match="set by the protocol"):
        proto.make_protocol("cnn", {"search": {"seed": 3}})
    with pytest.raises(UserError, match="unknown option select.nope"):
        proto.make_protocol("cnn", {"select.nope": 1})
    with pytest.raises(UserError, match="must be int"):
        proto.make_protocol("cnn", {"search.epochs": "many"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["protocol", "cnn", "--search.seed", "3"])


def test_other_settings_in_an_existing_protocol_directory_are_refused(full_protocol):
    settings = _settings(full_protocol.run_dir, seeds=3)
    with pytest.raises(UserError, match="other settings.*seeds"):
        proto.run(proto.make_protocol("cnn", settings))
    # Runtime options may change; the finished protocol is then just summarised again.
    result = proto.run(proto.load_protocol(full_protocol.run_dir, {"jobs": 1, "threads": 1}))
    assert _without_compute(result.summary) == _without_compute(full_protocol.summary)
    with pytest.raises(UserError, match="cannot change when resuming"):
        proto.load_protocol(full_protocol.run_dir, {"seeds": 3})
    with pytest.raises(UserError, match="holds a cnn protocol"):
        proto.load_protocol(full_protocol.run_dir, {}, target="rnn")


# Slow (about 8 s): stage processes; the in-process scheduler is covered by the default tests.
@pytest.mark.slow
def test_jobs_run_stages_in_separate_processes(full_protocol, tmp_path):
    # Two stage processes at a time; searches and selections match the in-process protocol exactly.
    result = proto.run(proto.make_protocol("cnn", _settings(tmp_path / "p", jobs=2, final_runs=1)))
    assert result.summary["candidates"] == full_protocol.summary["candidates"]
    assert result.summary["selection"] == full_protocol.summary["selection"]
    assert result.summary["final"]["runs"][0] == full_protocol.summary["final"]["runs"][0]
    assert math.isfinite(result.summary["final"]["test"]["mean"])


def test_rnn_protocol_end_to_end(data_dir, tmp_path):
    penn = data_dir / "penn"
    if not (penn / "train.txt").is_file():
        pytest.skip(f"{penn} not found")
    net = {"emsize": 8, "nhid": 8, "nhidlast": 8, "batch_size": 8, "bptt": 5, "max_steps": 2, "eval_batches": 2,
           "plots": False, "epochs": 1}
    settings = {"seeds": 2, "final_runs": 1, "threads": 1, "device": "cpu", "data": str(penn),
                "save": str(tmp_path / "r"), "search": net, "select": net, "final": {**net, "test_batch_size": 10}}
    result = proto.run(proto.make_protocol("rnn", settings))
    root, summary = result.run_dir, result.summary
    scores = {c["seed"]: c["selection_score"] for c in summary["candidates"]}
    for seed, score in scores.items():
        ppl = [r["valid_ppl"] for r in RunDir(root / f"select/seed-{seed}").read_metrics()]
        assert score == min(ppl)
        assert not (root / f"select/seed-{seed}/test.json").exists()  # selection never evaluates test.txt
    assert summary["selection"]["seed"] == min(scores, key=lambda s: (scores[s], s))
    test = json.loads((root / "final/run-0/test.json").read_text())
    assert summary["final"]["runs"][0]["test"] == test["test_ppl"]
