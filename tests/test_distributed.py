"""Data-parallel search and training: two CPU processes (gloo), tiny networks.

Each test starts two processes with ``torch.multiprocessing`` (or torchrun for the command line);
they run the ordinary engines, which join the process group from the environment torchrun would
set. The processes save what they hold into ``tmp_path``, and the test compares.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dartsnas import distributed
from dartsnas.cli import main
from dartsnas.errors import UserError

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, scenario: str, tmp: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        globals()[scenario](rank, Path(tmp), *args)
    finally:
        distributed.cleanup()


def spawn(scenario: str, tmp_path: Path, *args, timeout: float = 120.0) -> None:
    """Run ``scenario(rank, tmp_path, *args)`` in two processes; a failure in either fails the test."""
    ctx = mp.start_processes(_entry, args=(_free_port(), scenario, str(tmp_path), args), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{scenario} did not finish within {timeout} s (a process waits for the other?)")


def _forbid_writes() -> None:
    """In a non-main process: any write to the run directory fails the test."""
    from dartsnas import checkpoint, rundir
    from dartsnas.engine import common

    def refuse(*args, **kwargs):
        raise AssertionError("a process other than rank 0 wrote to the run directory")

    for module in (rundir, common, checkpoint):
        module.atomic_write = refuse  # type: ignore[attr-defined]
    rundir.RunDir.create = refuse  # type: ignore[method-assign]
    rundir.RunDir.logging = refuse  # type: ignore[method-assign]


def _capture(module, name: str, box: dict) -> None:
    """Wrap ``module.name`` (a model builder) so that the model it builds lands in ``box``."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        box["model"] = out[0] if isinstance(out, tuple) else out
        return out

    setattr(module, name, wrapper)


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _load(tmp_path: Path, rank: int) -> dict:
    return torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)


@pytest.fixture
def small_npz(cifar_train_npz: Path, tmp_path: Path) -> Path:
    """48 real CIFAR-10 images (+ 16 test images): two global batches of 12 per search stream."""
    with np.load(cifar_train_npz) as f:
        x, y = f["x"][:64], f["y"][:64]
    path = tmp_path / "small.npz"
    np.savez(path, x=x[:48], y=y[:48], x_test=x[48:], y_test=y[48:])
    return path


# -- search: every process holds the same weights, alphas and genotype --------------------------------


def _search_cnn(rank: int, tmp: Path, data: str) -> None:
    from dartsnas.engine import search_cnn

    box: dict = {}
    _capture(search_cnn, "build_search", box)
    if rank:
        _forbid_writes()
    cfg = search_cnn.SearchConfig(data=data, save=str(tmp / "run"), init_channels=2, layers=3, batch_size=6,
                                  epochs=2, unrolled=True, hvp_check=True, plots=False, seed=5)
    result = search_cnn.run(cfg)
    try:  # processes that disagree stop with one clear error
        distributed.check_same(f"value-{rank}", "a test value")
        message = ""
    except UserError as exc:
        message = str(exc)
    torch.save({"params": _parameters(box["model"]), "genotype": json.dumps(result.genotype.to_dict()),
                "metrics": json.dumps(result.metrics), "mismatch": message}, tmp / f"rank{rank}.pt")


# Slow: two processes through a whole second-order search (about 27 s);
# test_two_processes_step_like_one_process_with_the_double_batch and test_torchrun_command_line cover the CNN search
# by default.
@pytest.mark.slow
def test_two_process_cnn_search_keeps_ranks_identical(small_npz: Path, tmp_path: Path):
    spawn("_search_cnn", tmp_path, str(small_npz))
    a, b = _load(tmp_path, 0), _load(tmp_path, 1)
    assert a["params"].keys() == b["params"].keys() and "alphas_normal" in a["params"]
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), key
    assert a["genotype"] == b["genotype"]
    # Rank 0 wrote the run directory (rank 1 was forbidden to): 2 epochs of 24 / 12 = 2 global steps each.
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4] and "hvp_cosine" in metrics[0]
    assert json.loads((tmp_path / "run" / "genotype.json").read_text()) == json.loads(a["genotype"])
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert torch.equal(saved["alphas_reduce"], a["params"]["alphas_reduce"])
    # Reduced metrics are the same numbers in both processes.
    assert [m["valid_loss"] for m in json.loads(a["metrics"])] == [m["valid_loss"] for m in json.loads(b["metrics"])]
    assert "log.txt" in {p.name for p in (tmp_path / "run").iterdir()}
    for message in (a["mismatch"], b["mismatch"]):
        assert "disagree on a test value" in message and "\n" not in message


def _search_cnn_robust(rank: int, tmp: Path, data: str) -> None:
    # beta-DARTS with SDARTS-RS noise, then DrNAS: the seeded noise and samples must be the same in every
    # process (the engine stops with one error when the alphas or genotypes disagree after an epoch).
    from dartsnas.engine import search_cnn

    for name, options in (("rs", {"alpha_noise": 0.3, "beta_decay": 2.0}), ("dr", {"dirichlet": True,
                                                                                    "dirichlet_kl": 0.01})):
        box: dict = {}
        _capture(search_cnn, "build_search", box)
        cfg = search_cnn.SearchConfig(data=data, save=str(tmp / name), init_channels=2, layers=3, batch_size=6,
                                      epochs=2, max_steps=3, plots=False, seed=5, **options)
        search_cnn.run(cfg)
        torch.save(_parameters(box["model"]), tmp / f"{name}{rank}.pt")


@pytest.mark.slow
def test_two_process_robust_search_options_keep_ranks_identical(small_npz: Path, tmp_path: Path):
    spawn("_search_cnn_robust", tmp_path, str(small_npz))
    for name in ("rs", "dr"):
        a, b = (torch.load(tmp_path / f"{name}{r}.pt", weights_only=True) for r in range(WORLD))
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def _search_rnn(rank: int, tmp: Path, corpus: str) -> None:
    from dartsnas.engine import search_rnn

    box: dict = {}
    _capture(search_rnn, "build_search", box)
    if rank:
        _forbid_writes()
    cfg = search_rnn.RNNSearchConfig(data=corpus, save=str(tmp / "run"), emsize=8, nhid=8, nhidlast=8, batch_size=4,
                                     bptt=5, epochs=2, max_steps=6, eval_batches=2, unrolled=True, hvp="exact",
                                     plots=False, threads=1)
    result = search_rnn.run(cfg)
    torch.save({"params": _parameters(box["model"]), "genotype": json.dumps(result.genotype.to_dict())},
               tmp / f"rank{rank}.pt")


def test_two_process_rnn_search_keeps_ranks_identical(tiny_corpus: Path, tmp_path: Path):
    spawn("_search_rnn", tmp_path, str(tiny_corpus))
    a, b = _load(tmp_path, 0), _load(tmp_path, 1)
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), key
    assert a["genotype"] == b["genotype"]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


# -- averaging: 2 processes x batch b == 1 process x batch 2b ------------------------------------------

B = 3  # per-process batch


def _global_batches() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD * B, 3, 8, 8, generator=g, dtype=torch.float64)
    xv = torch.randn(WORLD * B, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (WORLD * B,), generator=g)
    yv = torch.randint(0, 4, (WORLD * B,), generator=g)
    return x, y, xv, yv


def _two_steps(mode: str, x, y, xv, yv, steps: int = 2) -> dict[str, torch.Tensor]:
    """Two search steps (alpha, then weights) of a tiny float64 search network."""
    from dartsnas.data.images import ImageData, ImageSet
    from dartsnas.engine.search_cnn import SearchConfig, build_search, weight_step

    cfg = SearchConfig(init_channels=2, layers=3, nodes=2, unrolled=mode != "first",
                       hvp="exact" if mode == "exact" else "fd", channels_last="off", grad_clip=1.0)
    images = ImageSet(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64))
    data = ImageData("t", images, None, 4, (0.5,) * 3, (0.25,) * 3, pad=0, flip=False)
    torch.manual_seed(0)
    model, w_opt, _, architect = build_search(cfg, data, torch.device("cpu"), torch.float64)
    # Batch norm on its running statistics: the forward of one image no longer depends on the rest
    # of its batch, so a split batch is the same mathematics.
    model.eval()
    for lr in (0.1, 0.05)[:steps]:  # the second step's virtual step also uses the momentum buffers
        architect.step((x, y), (xv, yv), lr)
        weight_step(model, w_opt, x, y, cfg.grad_clip)
    return _parameters(model)


MODES = ("first", "fd", "exact")


def _averaging(rank: int, tmp: Path) -> None:
    distributed.setup("cpu")
    lo, hi = distributed.shard_bounds(WORLD * B)
    x, y, xv, yv = (t[lo:hi] for t in _global_batches())
    torch.save({mode: _two_steps(mode, x, y, xv, yv) for mode in MODES}, tmp / f"rank{rank}.pt")


def test_two_processes_step_like_one_process_with_the_double_batch(tmp_path: Path):
    spawn("_averaging", tmp_path)
    ranks = [_load(tmp_path, r) for r in range(WORLD)]
    for mode in MODES:
        reference = _two_steps(mode, *_global_batches())
        for name, want in reference.items():
            got0, got1 = ranks[0][mode][name], ranks[1][mode][name]
            assert torch.equal(got0, got1), (mode, name)
            torch.testing.assert_close(got0, want, rtol=1e-9, atol=1e-11, msg=f"{mode} {name}")
    # The weights and alphas really moved (the comparison is not between untouched tensors).
    start = _two_steps("first", *_global_batches(), steps=0)
    for name in ("alphas_normal", "alphas_reduce", "classifier.weight"):
        assert not torch.allclose(start[name], ranks[0]["fd"][name], rtol=0, atol=1e-6), name


# -- training: DistributedDataParallel, rank 0 writes, resume in one process ------------------------


class _Stop(Exception):
    pass


def _train_cifar(rank: int, tmp: Path, data: str) -> None:
    from dartsnas.engine import train_cnn

    box: dict = {}
    _capture(train_cnn, "build_network", box)
    if rank:
        _forbid_writes()
    records: list[dict] = []

    def stop_after_first(epoch: int, record: dict) -> None:
        records.append(record)
        raise _Stop

    cfg = train_cnn.CifarTrainConfig(data=data, save=str(tmp / "run"), layers=3, init_channels=4, batch_size=16,
                                     global_batch="keep", epochs=2, valid_size=16, drop_path_prob=0.2, plots=False,
                                     threads=1, report_freq=1000, seed=3)
    with pytest.raises(_Stop):
        train_cnn.run(cfg, on_epoch_end=stop_after_first)
    strip = {k: v for k, v in records[0].items() if "time" not in k and "per_s" not in k}
    torch.save({"params": _parameters(box["model"]), "record": json.dumps(strip)}, tmp / f"rank{rank}.pt")


def test_two_process_training_agrees_and_resumes_in_one_process(small_npz: Path, tmp_path: Path):
    from dartsnas.engine.train_cnn import run

    spawn("_train_cifar", tmp_path, str(small_npz))
    a, b = _load(tmp_path, 0), _load(tmp_path, 1)
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), key
    assert a["record"] == b["record"]  # metrics reduced over the processes
    run_dir = tmp_path / "run"
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2  # 32 training images / global batch 16
    for key, value in a["params"].items():
        assert torch.equal(state["model"][key], value), key
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1

    resumed = run(resume=run_dir)  # one process takes over the two processes' run
    assert [m["epoch"] for m in resumed.metrics] == [1, 2] and resumed.metrics[-1]["step"] == 4
    assert resumed.test is not None and resumed.test.images == 16
    assert (run_dir / "final.safetensors").is_file()


# -- the command line under torchrun, and one-line errors ----------------------------------------------


# Slow (about 8 s): two processes under torchrun; the two-process engine tests above stay in the default set.
@pytest.mark.slow
def test_torchrun_command_line(small_npz: Path, tmp_path: Path):
    save = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
           str(_free_port()), "-m", "dartsnas", "search", "cnn", "--data", str(small_npz), "--layers", "3",
           "--init-channels", "2", "--batch_size", "12", "--global_batch", "keep", "--epochs", "1", "--save",
           str(save), "--no-plots", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    # Only rank 0 prints the result and logs (the log lines start with a time stamp).
    assert sum(line.startswith("genotype = Genotype(") for line in lines) == 1
    assert sum(line.endswith(" epoch 1/1 lr 0.025") for line in lines) == 1
    assert "global batch 12 (2 processes x 6)" in out.stdout
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 2


def test_bad_settings_are_one_line_errors(small_npz: Path, tmp_path: Path, capsys):
    with pytest.raises(UserError, match="not divisible by 4"):
        distributed.per_rank_batch(10, "keep", world=4)
    assert distributed.per_rank_batch(12, "keep", world=4) == 3
    assert distributed.per_rank_batch(10, "scale", world=4) == 10
    assert distributed.per_rank_batch(10, "keep", world=1) == 10
    for argv in (["search", "cnn", "--data", str(small_npz)], ["train", "cifar10", "--data", str(small_npz)]):
        assert main([*argv, "--sync_bn", "--device", "cpu", "--save", str(tmp_path / "r"), "--no-plots"]) == 2
        err = capsys.readouterr().err
        assert "--sync_bn needs CUDA" in err and err.count("\n") == 1
    assert main(["search", "cnn", "--sync_bn", "--unrolled", "--hvp", "exact", "--save", str(tmp_path / "r")]) == 2
    assert "SyncBatchNorm has no double backward" in capsys.readouterr().err


def test_sharded_streams_cover_each_global_batch_once():
    from dartsnas.data.images import BatchStream, ImageSet, Normalizer, epoch_generator

    n = 23
    images = ImageSet(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous(),
                      torch.arange(n))
    norm = Normalizer((0.0,), (1 / 255.0,), torch.device("cpu"))

    def batches(rank: int, world: int, train: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        stream = BatchStream(images, torch.arange(n), 6, norm, pad=1, flip=True, train=train, rank=rank, world=world)
        return list(stream.batches(epoch_generator(0, 0, 0) if train else None))

    one = batches(0, 1, True)
    two = [batches(r, 2, True) for r in range(2)]
    # Every process takes its half of each of the single process's global batches (the last,
    # incomplete one is dropped), augmented exactly as the single process augments it.
    assert len(one) == 4 and len(two[0]) == len(two[1]) == 3
    for (x, y), (x0, y0), (x1, y1) in zip(one, *two):
        assert len(y0) == len(y1) == 3
        assert torch.equal(torch.cat([y0, y1]), y) and torch.equal(torch.cat([x0, x1]), x)
    evaluation = [batches(r, 2, False) for r in range(2)]
    assert [lab for pair in zip(*evaluation) for _, y in pair for lab in y.tolist()] == list(range(n))
