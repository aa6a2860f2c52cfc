"""``benchmarks/study/study.py``: the plan's checks, the permutation test, and a tiny study end to end."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import sys
from pathlib import Path

import pytest

from dartsnas.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("study", REPO / "benchmarks" / "study" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["study"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


study = _module()


def test_permutation_test_known_answers():
    # Completely separated groups of 2 and 2: 2 of the 6 splits are as extreme (the observed one and
    # its mirror), so p = 1/3.
    assert study.permutation_test([10.0, 11.0], [1.0, 2.0]) == pytest.approx(2 / 6)
    # Identical groups: every split is at least as extreme as a difference of 0.
    assert study.permutation_test([5.0, 5.0], [5.0, 5.0, 5.0]) == 1.0
    # 3 cells far above 6 cells: only the observed split is as extreme; p = 1 / C(9, 3).
    assert study.permutation_test([90.0, 91.0, 92.0], [50.0, 51.0, 52.0, 53.0, 54.0, 55.0]) == pytest.approx(
        1 / math.comb(9, 3))
    # The same splits whichever group is named first (the smaller one is enumerated).
    assert study.permutation_test([50.0, 51.0, 52.0, 53.0, 54.0, 55.0], [90.0, 91.0, 92.0]) == pytest.approx(
        1 / math.comb(9, 3))
    a, b = [1.0, 4.0, 2.5, 7.0, 3.0], [2.0, 6.0, 5.5]
    assert study.permutation_test(a, b) == study.permutation_test(b, a)
    # Brute force over index subsets of the first group's size.
    pooled, obs = a + b, abs(sum(a) / 5 - sum(b) / 3)
    splits = list(itertools.combinations(range(8), 5))
    extreme = sum(abs(sum(pooled[i] for i in s) / 5 - sum(pooled[i] for i in range(8) if i not in s) / 3) >= obs - 1e-12
                  for s in splits)
    assert study.permutation_test(a, b) == pytest.approx(extreme / len(splits))


def test_pooled_comparison_takes_every_searched_cell():
    pooled = study.pooled_comparison([[60.0, 61.0], [62.0]], [50.0, 51.0, 52.0])
    assert pooled["cells"] == 3 and pooled["mean"] == pytest.approx(61.0)
    assert pooled["difference"] == pytest.approx(10.0)
    # All three searched cells above all three random ones: the observed split and its mirror of C(6, 3).
    assert pooled["p_value"] == pytest.approx(2 / 20) == pooled["smallest_possible_p"]
    assert study.pooled_comparison([[60.0, 61.0]], [50.0, 51.0]) is None  # one group: its own test says it
    assert study.pooled_comparison([[60.0], [61.0]], [50.0]) is None  # too few random cells


def test_spearman_known_answers():
    assert study.spearman([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == pytest.approx(1.0)
    assert study.spearman([1.0, 2.0, 3.0], [3.0, 1.0, 0.0]) == pytest.approx(-1.0)
    # Ties share their mean rank: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4) give 4.5 / sqrt(4.5 * 5).
    assert study.spearman([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert study.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None  # no ranking to correlate


def _plan(tmp_path: Path, cifar: Path, **extra: str) -> Path:
    text = f"""
data:
  train: {cifar / 'cifar10_train_first4000_exact.npz'}
  test: {cifar / 'cifar10_test_first1000_exact.npz'}
search_seeds: [0]
train_seeds: [0]
random_cells: 2
fixed_cells: [DARTS_V2]
threads: 1
search: {{init_channels: 4, layers: 3, batch_size: 16, epochs: 1, max_steps: 2, plots: false}}
train: {{init_channels: 4, layers: 3, batch_size: 32, epochs: 1, max_steps: 2, auxiliary: false, plots: false}}
groups:
  first-order: {{}}
""" + "".join(f"{k}: {v}\n" for k, v in extra.items())
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def cifar(cifar_train_npz: Path, cifar_test_npz: Path) -> Path:
    return cifar_train_npz.parent


def test_plan_errors_are_one_line(tmp_path, cifar):
    bad = _plan(tmp_path, cifar).read_text().replace("first-order: {}", "first-order: {seed: 3}")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(UserError, match="set by the study"):
        study.load_plan(str(tmp_path / "bad.yaml"))
    bad = _plan(tmp_path, cifar).read_text().replace("first-order: {}", "first-order: {unroled: true}")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(UserError, match="not an option"):
        study.load_plan(str(tmp_path / "bad.yaml"))
    bad = _plan(tmp_path, cifar).read_text().replace("DARTS_V2", "DARTS_V9")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(UserError):
        study.load_plan(str(tmp_path / "bad.yaml"))


def test_stages_share_settings_and_seeds(tmp_path, cifar):
    plan = study.load_plan(str(_plan(tmp_path, cifar)))
    stages = study.stages(plan, tmp_path / "s")
    names = [s.name for s in stages]
    assert names == ["search/first-order/seed-0", "train/search/first-order/seed-0/run-0",
                     "train/random/cell-0/run-0", "train/random/cell-1/run-0", "train/DARTS_V2/run-0"]
    trains = [s for s in stages if s.kind == "train"]
    # Every cell is retrained with identical settings; only the architecture differs.
    common = [{k: v for k, v in s.config.items() if k not in ("arch", "save")} for s in trains]
    assert all(c == common[0] for c in common)
    assert trains[0].deps == ("search/first-order/seed-0",)
    assert len({s.config["arch"] for s in trains}) == 4


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resume(tmp_path, cifar, capsys):
    plan = _plan(tmp_path, cifar)
    out = tmp_path / "study"
    assert study.main(["run", str(plan), "--dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages_done"] == summary["stages"] == 5
    groups = summary["groups"]
    assert groups["random"]["cells"] == 2 and groups["DARTS_V2"]["cells"] == 1
    assert groups["first-order"]["test_acc"]["n"] == 1
    for g in groups.values():
        assert 0.0 <= g["test_acc"]["mean"] <= 100.0
    assert groups["first-order"]["search_cpu_minutes"]["mean"] > 0
    # Every number is read back from the stage directories: the search cell's accuracy is its run's.
    cell = next(c for c in summary["cells"] if c["group"] == "first-order")
    metrics = (out / "train/search/first-order/seed-0/run-0/metrics.jsonl").read_text().splitlines()
    assert cell["test_acc"] == [json.loads(metrics[-1])["test_acc"]]
    assert cell["train_acc"] == [json.loads(metrics[-1])["train_acc"]]
    from dartsnas import create_model

    network = create_model(cell["genotype"], "cifar10", init_channels=4, layers=3)
    assert cell["parameters"] == sum(p.numel() for p in network.parameters())
    assert (out / "summary.md").is_file()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "cells.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Running again finds everything done and changes no result.
    before = (out / "manifest.json").read_text()
    assert study.main(["run", str(plan), "--dir", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["stages"] == json.loads(before)["stages"]
    capsys.readouterr()
    assert study.main(["status", str(plan), "--dir", str(out)]) == 0
    assert capsys.readouterr().out.count("done") == 5


def test_interrupted_stage_is_resumed_not_lost(tmp_path, cifar, monkeypatch):
    """A stage that fails is recorded with its error, the others still run, and the next run retries it."""
    plan = study.load_plan(str(_plan(tmp_path, cifar)))
    calls = []

    def fake(module, cls_name, config, resume):
        calls.append(config["save"])
        if "cell-0" in config["save"] and len(calls) < 6:
            raise RuntimeError("disk on fire")
        Path(config["save"]).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(study, "run_stage", fake)
    out = tmp_path / "s"
    assert study.run(plan, out, None, None) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["train/random/cell-0/run-0"] == {**manifest["stages"]["train/random/cell-0/run-0"],
                                                               "status": "failed", "error": "disk on fire"}
    assert manifest["stages"]["train/DARTS_V2/run-0"]["status"] == "done"
    assert study.run(plan, out, None, None) == 0
    assert calls[-1].endswith("cell-0/run-0")


def test_set_changes_the_plan_and_a_study_keeps_its_settings(tmp_path, cifar, monkeypatch, capsys):
    plan_file = str(_plan(tmp_path, cifar))
    plan = study.load_plan(plan_file, ["search.epochs=3", "groups.first-order.unrolled=true", "search_seeds=[4]"])
    first = study.stages(plan, tmp_path / "s")[0]
    assert first.name == "search/first-order/seed-4"
    assert first.config["epochs"] == 3 and first.config["unrolled"] is True
    with pytest.raises(UserError, match="KEY=VALUE"):
        study.load_plan(plan_file, ["search.epochs"])
    with pytest.raises(UserError, match="not an option"):
        study.load_plan(plan_file, ["search.epoch=3"])

    monkeypatch.setattr(study, "run_stage", lambda module, cls_name, config, resume: None)
    out = tmp_path / "s"
    assert study.main(["run", plan_file, "--dir", str(out)]) == 0
    capsys.readouterr()
    # Other settings in the same directory would mix two studies' numbers: refused, nothing run.
    assert study.main(["run", plan_file, "--dir", str(out), "--set", "train.epochs=2"]) == 2
    assert "other plan settings" in capsys.readouterr().err


def test_image_size_goes_through_an_image_folder_of_exact_pixels(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), np.arange(12) % 3
    np.savez(tmp_path / "train.npz", x=x, y=y, class_names=np.array(["a", "b", "c"]))
    np.savez(tmp_path / "test.npz", x=x[:6], y=y[:6])
    text = f"""
data: {{train: {tmp_path / 'train.npz'}, test: {tmp_path / 'test.npz'}, image_size: 16}}
search: {{epochs: 1}}
train: {{epochs: 1}}
groups: {{first-order: {{}}}}
"""
    (tmp_path / "plan.yaml").write_text(text)
    plan = study.load_plan(str(tmp_path / "plan.yaml"))
    out = tmp_path / "s"
    study.prepare_data(plan, out)
    files = sorted((out / "data" / "train").rglob("*.png"))
    assert len(files) == 12 and {f.parent.name for f in files} == {"a", "b", "c"}
    assert len(list((out / "data" / "val").rglob("*.png"))) == 6
    assert np.array_equal(np.asarray(Image.open(out / "data" / "train" / "b" / "000001.png")), x[1])
    search, train = study.stages(plan, out)[0], study.stages(plan, out)[-1]
    assert search.config["dataset"] == train.config["dataset"] == "folder"
    assert search.config["image_size"] == train.config["image_size"] == 16
    assert train.config["test_data"] is None


def test_earlier_sitting_fills_cells_without_a_result_here(tmp_path, cifar, monkeypatch, capsys):
    """A study run in sittings: cells whose stage directories are gone take their record from the earlier
    sitting's summary.json; cells with a result here keep theirs; another plan's summary is refused."""
    plan_file = str(_plan(tmp_path, cifar))
    plan = study.load_plan(plan_file)
    earlier = {"plan": "plan.yaml", "plan_digest": plan.digest(), "overrides": [], "cpu_minutes_total": 12.0,
               "cells": [{"group": "random", "cell": "random/cell-0", "test_acc": [41.0], "mean_test_acc": 41.0,
                          "train_acc": [40.0], "parameters": 1000},
                         {"group": "random", "cell": "random/cell-1", "test_acc": [43.0], "mean_test_acc": 43.0,
                          "train_acc": [42.0], "parameters": 1200},
                         {"group": "DARTS_V2", "cell": "DARTS_V2", "test_acc": [47.0], "mean_test_acc": 47.0,
                          "train_acc": [46.0], "parameters": 900}]}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))

    # This sitting retrains only DARTS_V2 (a stand-in run that writes one metrics record).
    def fake(module, cls_name, config, resume):
        save = Path(config["save"])
        save.mkdir(parents=True, exist_ok=True)
        (save / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_acc": 55.0, "test_acc": 50.0}) + "\n")

    monkeypatch.setattr(study, "run_stage", fake)
    out = tmp_path / "s"
    assert study.run(plan, out, None, {"DARTS_V2"}) == 0
    summary = study.summarize(plan, out, study.load_earlier(plan, [str(path)]))
    assert summary["groups"]["random"]["per_cell"] == [41.0, 43.0]
    assert summary["groups"]["DARTS_V2"]["per_cell"] == [50.0]  # the result here wins
    cells = {c["cell"]: c for c in summary["cells"]}
    assert cells["random/cell-0"]["from"] == str(path) and "from" not in cells["DARTS_V2"]
    assert summary["stages_done"] == 1 + 2
    assert summary["cpu_minutes_total"] >= 12.0
    assert summary["earlier_sittings"] == [{"summary": str(path), "cells": 2, "cpu_minutes_total": 12.0,
                                            "machine": None}]
    assert summary["plan_digest"] == plan.digest()
    assert summary["machine"]["cpu"] and summary["machine"]["torch_cpu_capability"]
    study.write_outputs(summary, out)
    text = (out / "summary.md").read_text()
    assert "2 cells taken from an earlier sitting" in text and "a machine the summary did not record" in text
    assert f"CPU time measured on: {summary['machine']['cpu']}" in text

    # A summary of other settings, or something that is not a summary: one line, nothing written.
    other = study.load_plan(plan_file, ["train.epochs=2"])
    with pytest.raises(UserError, match="other plan settings"):
        study.load_earlier(other, [str(path)])
    (tmp_path / "junk.json").write_text("[1, 2]")
    capsys.readouterr()
    assert study.main(["summary", plan_file, "--dir", str(out), "--earlier", str(tmp_path / "junk.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a study summary" in err
    # A summary from before the digest was recorded: accepted when plan file and overrides agree.
    path.write_text(json.dumps({k: v for k, v in earlier.items() if k != "plan_digest"}))
    assert len(study.load_earlier(plan, [str(path)])) == 1
    with pytest.raises(UserError, match="other plan settings"):
        study.load_earlier(other, [str(path)])
