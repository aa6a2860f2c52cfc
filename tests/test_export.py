"""``dartsnas export``: each format, loaded by its own runtime, gives PyTorch's outputs (a recurrent model's steps
those of the whole model); nothing is overwritten without --force."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import dartsnas
from dartsnas.checkpoint import save_weights
from dartsnas.cli import main
from dartsnas.models.cnn import NetworkCIFAR, NetworkImageNet
from dartsnas.models.rnn import RNNModel

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# torch.jit.load is deprecated in favour of torch.export, but TorchScript files are still what many runtimes read.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A training run directory holding a tiny CIFAR-10 network's final.safetensors (with its genotype)."""
    genotype = dartsnas.get_genotype("DARTS_V2")
    net = NetworkCIFAR(4, 10, 3, True, genotype)
    folder = tmp_path / "run"
    folder.mkdir()
    save_weights(folder / "final.safetensors", net, "cifar10", genotype, {"batch_size": 8})
    return folder


def _load_and_run(path: Path, fmt: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The exported file run by the runtime of its format (independently of dartsnas)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [arg.name for arg in session.get_inputs()]
        return tuple(torch.from_numpy(y) for y in session.run(None, dict(zip(names, (x.numpy() for x in inputs)))))
    module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    with torch.no_grad():
        out = module(*inputs)
    return tuple(out) if isinstance(out, tuple | list) else (out,)


def _skip_without_onnx(fmt: str) -> None:
    if fmt == "onnx":
        missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            pytest.skip(f"ONNX export check needs {', '.join(missing)} (pip install -e '.[test]')")


@pytest.mark.parametrize("fmt", ["torchscript", "pt2", "onnx"])
def test_each_format_gives_pytorchs_logits_for_any_batch(fmt: str, run_dir: Path, capsys):
    _skip_without_onnx(fmt)
    assert main(["export", str(run_dir), "--format", fmt]) == 0
    out = capsys.readouterr().out
    written = run_dir / {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "pt2": "model.pt2"}[fmt]
    assert f"wrote {written}" in out and "largest output difference" in out
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(["final.safetensors", written.name])  # no leftovers
    model = dartsnas.load_model(run_dir)
    for batch in (1, 5):  # traced with 2 images: the batch dimension is free
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(images)
        (got,) = _load_and_run(written, fmt, images)
        assert got.shape == (batch, 10)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_fixed_batch_and_the_authors_imagenet_file(tmp_path: Path, capsys):
    # The authors' released files are bare state_dicts: the architecture comes from --arch.
    net = NetworkImageNet(4, 7, 3, True, dartsnas.get_genotype("DARTS_V1")).eval()
    weights = tmp_path / "imagenet_model.pt"
    torch.save(net.state_dict(), weights)
    assert main(["export", str(weights), "--arch", "DARTS_V1", "--format", "pt2", "--batch", "4",
                 "--image_size", "64"]) == 0
    assert "graph: images 4x3x64x64" in capsys.readouterr().out
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = net(images)
    torch.testing.assert_close(_load_and_run(tmp_path / "imagenet_model.pt2", "pt2", images)[0], expected,
                               rtol=1e-4, atol=1e-5)


def test_an_existing_file_is_kept_unless_force(run_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "mine.pt"
    out.write_text("something the user made")
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists; pass --force" in err
    assert out.read_text() == "something the user made"
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out), "--force",
                 "--no-verify"]) == 0
    assert "not checked" in capsys.readouterr().out
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_load_and_run(out, "torchscript", images)[0], dartsnas.load_model(run_dir)(images))


@pytest.fixture
def lm_file(tmp_path: Path) -> Path:
    """A tiny recurrent language model's weights, as a training run writes them."""
    genotype = dartsnas.get_genotype("DARTS", "rnn")
    args = {"ntoken": 30, "ninp": 8, "nhid": 8, "nhidlast": 8}
    lm = RNNModel(genotype=genotype, packed=True, **args)  # packed weights, as training writes them
    path = tmp_path / "lm.safetensors"
    save_weights(path, lm, "ptb", genotype, {}, extra={"model_args": json.dumps(args)})
    return path


def test_bad_requests_are_one_line(run_dir: Path, lm_file: Path, tmp_path: Path, capsys):
    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    assert "--format onnx|torchscript|pt2" in error(["export", str(run_dir)])
    assert "does not exist" in error(["export", str(tmp_path / "nothing"), "--format", "pt2"])
    assert "folder of" in error(["export", str(run_dir), "--format", "pt2", "--out", str(tmp_path / "no" / "m.pt2")])
    assert "image_size applies to convolutional" in error(["export", str(tmp_path / "lm.safetensors"), "--format",
                                                           "pt2", "--image_size", "32"])


# TorchScript by default; the slower pt2 and ONNX exports of the step with the slow tests.
@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("pt2", marks=pytest.mark.slow),
                                 pytest.param("onnx", marks=pytest.mark.slow)])
def test_a_language_model_steps_through_a_sequence_as_the_whole_model_does(fmt: str, lm_file: Path, capsys):
    _skip_without_onnx(fmt)
    assert main(["export", str(lm_file), "--format", fmt, "--out", str(lm_file.parent / f"step.{fmt}")]) == 0
    assert "graph: tokens 1xN (int64), hidden Nx8" in capsys.readouterr().out
    model = dartsnas.load_model(lm_file)
    tokens = torch.randint(0, 30, (6, 4))  # 6 steps of a batch of 4 (traced with a batch of 2)
    with torch.no_grad():
        whole = model(tokens, model.init_hidden(4))
    hidden, logits = model.init_hidden(4), []
    for t in range(6):
        step, hidden = _load_and_run(lm_file.parent / f"step.{fmt}", fmt, tokens[t:t + 1], hidden)
        logits.append(step)
    torch.testing.assert_close(torch.cat(logits), whole.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden, whole.hidden, rtol=1e-4, atol=1e-5)
