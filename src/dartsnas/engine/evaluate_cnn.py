"""``dartsnas test cifar10|imagenet`` and ``dartsnas info``: evaluate trained convolutional networks.

``test`` accepts our own weights (``final.safetensors``, ``best.safetensors``, a run directory or
its ``checkpoints/last.pt``) and the authors' released ``cifar10_model.pt`` / ``imagenet_model.pt``.
The network's size and auxiliary head are read off the weights; the genotype from the file's
metadata, or ``--arch``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..checkpoint import LoadedWeights, load_into, load_weights
from ..data.images import CIFAR10_MEAN, CIFAR10_STD, BatchStream, ImageSet, Normalizer, load_image_data, read_npz
from ..errors import UserError
from ..genotype import Genotype, load_genotype
from ..models.cnn import build_network, count_network_parameters, multiply_adds
from ..settings.choices import AMP_CHOICES, NETWORK_DEFAULTS  # noqa: F401 -- AMP_CHOICES: still importable here
from ..settings.evaluate_cnn import InfoConfig, TestConfig
from ..utils import AverageMeter, accuracy, resolve_device

logger = logging.getLogger("dartsnas")

NETWORK_NAMES = {"cifar10": "CIFAR-10", "imagenet": "ImageNet"}


# -- runtime settings shared with training ------------------------------------------------------


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where the GPU supports it, else fp16; float32 (None) on the CPU."""
    if setting == "off":
        return None
    if device.type != "cuda":
        if setting == "auto":
            return None
        raise UserError(f"--amp {setting} needs a CUDA device; on the CPU the networks run in float32 "
                        f"(use --amp off or --amp auto)")
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def use_channels_last(setting: str, device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Channels-last where it helps: on the CPU (depthwise and 1x1 convolutions run faster) and on
    CUDA under mixed precision (tensor-core convolutions want NHWC)."""
    if setting in ("on", "off"):
        return setting == "on"
    return device.type == "cpu" or amp_dtype is not None


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


# -- evaluation ---------------------------------------------------------------------------------


@dataclass
class EvalResult:
    loss: float
    top1: float  # accuracy in percent
    top5: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def as_record(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_loss": self.loss, f"{prefix}_acc": self.top1, f"{prefix}_acc_top5": self.top5}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False,
             max_batches: int | None = None) -> EvalResult:
    """Cross-entropy loss and top-1/top-5 accuracy of ``model`` in evaluation mode."""
    was_training = model.training
    model.eval()
    loss_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    try:
        for i, (x, y) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                logits = model(x)
            logits = logits.float()
            n = y.shape[0]
            top1, top5 = accuracy(logits, y, topk=(1, 5))
            loss_m.update(F.cross_entropy(logits, y).item(), n)
            top1_m.update(top1, n)
            top5_m.update(top5, n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        model.train(was_training)
    return EvalResult(loss_m.avg, top1_m.avg, top5_m.avg, loss_m.count, time.perf_counter() - t0)


# -- CIFAR-10 test images -----------------------------------------------------------------------


def _cifar_npz(path: str) -> tuple[ImageSet, str]:
    """The test images of one .npz file and a label saying which arrays they are: ``x_test``/``y_test`` when
    the file has them (a file holding both splits), else ``x``/``y`` (a file holding test images only)."""
    train, test = read_npz(path)
    images, source = (test, f"{path} (x_test)") if test is not None else (train, str(path))
    if tuple(images.x.shape[1:]) != (3, 32, 32):
        raise UserError(f"{path} holds images of shape {tuple(images.x.shape[1:])}, not CIFAR-10's 3x32x32")
    if int(images.y.max()) > 9:
        raise UserError(f"{path} has labels above 9; CIFAR-10 has 10 classes")
    return images, source


def sibling_test_file(data: str) -> tuple[str | None, list[str]]:
    """The one ``*test*.npz`` next to a training ``.npz`` file, and every candidate found."""
    here = Path(data)
    candidates = sorted(str(p) for p in here.parent.glob("*.npz") if "test" in p.name.lower() and p != here)
    return (candidates[0] if len(candidates) == 1 else None), candidates


def cifar_test_images(data: str | None, test_data: str | None, download: bool = True,
                      required: bool = True, flag: str = "--test_data") -> tuple[ImageSet | None, str]:
    """The test images of a run *trained* on ``data``, and where they came from.

    ``data`` is the training set here (``dartsnas train cifar10 --data``); the test images come from, in
    order: ``test_data`` (an .npz: ``x_test``/``y_test`` if present, else ``x``/``y``); the ``x_test``
    arrays of a ``data`` .npz; the single ``*test*.npz`` next to a ``data`` .npz; the test batch of a
    CIFAR-10 folder. ``data`` itself is never the answer: its ``x``/``y`` are the training images.
    Without test images this returns None, or, when ``required``, refuses naming ``flag``.
    ``dartsnas test``, where ``--data`` names the images to evaluate, uses :func:`cifar_eval_images`.
    """
    if test_data:
        if not Path(test_data).is_file():
            raise UserError(f"test data file {test_data} does not exist; pass an existing .npz file with {flag}")
        return _cifar_npz(test_data)
    if data and str(data).endswith(".npz"):
        if not Path(data).is_file():
            raise UserError(f"CIFAR-10 file {data} does not exist; pass an existing .npz file or a CIFAR-10 folder")
        _, test = read_npz(data)
        if test is not None:
            return _cifar_npz(data)
        found, candidates = sibling_test_file(data)
        if found:
            return _cifar_npz(found)
        if not required:
            return None, ""
        hint = f" (several candidates: {', '.join(candidates)})" if candidates else ""
        raise UserError(f"{data} holds no test images and no single *test*.npz lies next to it{hint}; "
                        f"pass {flag} FILE.npz")
    loaded = load_image_data("cifar10", data, download=download)
    return loaded.test, str(data or "the CIFAR-10 folder")


def cifar_eval_images(data: str | None, test_data: str | None = None, download: bool = True) -> tuple[ImageSet, str]:
    """The images ``dartsnas test cifar10`` evaluates, and where they came from: exactly what it is given.

    ``--data FILE.npz`` (or ``--test_data FILE.npz``): that file, its ``x_test``/``y_test`` arrays if it
    has them, else its ``x``/``y``; ``--data DIR``: the test batch of that CIFAR-10 folder; neither: the
    test batch of the default folder. Nothing is looked up beside a file, and two different sources are
    refused rather than one of them picked.
    """
    if data and test_data and Path(data).resolve() != Path(test_data).resolve():
        raise UserError(f"--data {data} and --test_data {test_data} name different images; pass only the ones "
                        f"to evaluate, with --data FILE.npz or --data DIR")
    path = test_data or data
    if path and (test_data or str(path).endswith(".npz") or Path(path).is_file()):
        if not Path(path).is_file():
            raise UserError(f"test data file {path} does not exist; pass an existing .npz file or a CIFAR-10 "
                            f"folder with --data")
        return _cifar_npz(path)
    loaded = load_image_data("cifar10", data, download=download)
    return loaded.test, str(data or "the CIFAR-10 folder")


def cifar_batches(images: ImageSet, batch_size: int, device: torch.device, rank: int = 0, world: int = 1,
                  mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches in order, normalised with ``mean`` and ``std``; with ``world`` processes, this ``rank``'s
    slice of each."""
    normalize = Normalizer(mean, std, device)
    stream = BatchStream(images.to(device), torch.arange(len(images)), batch_size, normalize, train=False,
                         rank=rank, world=world)
    return stream.batches()


# -- your own images ----------------------------------------------------------------------------


def trained_data(loaded: LoadedWeights, where: str) -> dict[str, Any] | None:
    """The data record of the run that wrote the weights (classes, input size, normalisation), if any."""
    text = loaded.meta.get("data")
    if not text:
        return None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        record = None

    def numbers(value: Any, n: int) -> bool:
        return (isinstance(value, list) and len(value) == n
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))

    # Hand-edited or damaged files: one line, never a crash halfway through the evaluation.
    if not (isinstance(record, dict) and isinstance(record.get("num_classes"), int)
            and isinstance(record.get("in_channels"), int) and numbers(record.get("image_size"), 2)
            and all(record.get(k) is None or numbers(record[k], record["in_channels"]) for k in ("mean", "std"))
            and (record.get("classes") is None or isinstance(record["classes"], list))):
        raise UserError(f"{where} has damaged metadata (its data record is unreadable)")
    return record


def folder_test_images(data: str | None, record: dict[str, Any], image_size: int | None) -> tuple[ImageSet, str]:
    """The images to test a network trained on a folder: ``DIR/val/`` of a train/ + val/ folder, else the
    class folders of ``DIR`` itself, read at the training run's ``--image_size``; their classes must be
    the ones the network was trained on."""
    from ..data.folder import is_split_layout, read_image_folder

    if record.get("source") == "python" and record.get("mean") is None:
        raise UserError("this network was trained on a Python Dataset, whose transform the command line cannot "
                        "repeat; evaluate it from Python: model = dartsnas.load_model(RUN_DIR)")
    if not data:
        raise UserError("pass the images to test with --data DIR (class folders, or train/ and val/ folders)")
    root = Path(data)
    split = root / "val" if root.is_dir() and is_split_layout(root) else root
    found = read_image_folder(split, image_size)
    images = found.train
    if record.get("classes") is not None and found.classes != record["classes"]:
        raise UserError(f"{split} has the classes {found.classes} but the network was trained on "
                        f"{record['classes']}; test it on images of the same classes")
    if len(found.classes) != record["num_classes"]:
        raise UserError(f"{split} has {len(found.classes)} classes but the network predicts {record['num_classes']}")
    size = [int(images.x.shape[2]), int(images.x.shape[3])]
    if size != list(record["image_size"]):
        raise UserError(f"{split} holds {size[1]}x{size[0]} images but the network was trained on "
                        f"{record['image_size'][1]}x{record['image_size'][0]} ones; resize them to that size")
    return images, str(split)


# -- reading a network off its weights ----------------------------------------------------------


def infer_network(state: Mapping[str, torch.Tensor], network: str, where: str) -> dict[str, Any]:
    """Channels, cells, classes and auxiliary head of the network a state_dict belongs to."""
    stem_key = {"cifar10": "stem.0.weight", "imagenet": "stem0.3.weight"}[network]
    if stem_key not in state or "classifier.weight" not in state:
        other = "imagenet" if network == "cifar10" else "cifar10"
        hint = (f"; these look like {NETWORK_NAMES[other]} weights: use dartsnas test {other}"
                if {"cifar10": "stem.0.weight", "imagenet": "stem0.3.weight"}[other] in state else "")
        article = "an" if network == "imagenet" else "a"
        raise UserError(f"{where} does not hold {article} {NETWORK_NAMES[network]} evaluation network (no {stem_key})"
                        f"{hint}")
    if state[stem_key].ndim != 4 or state["classifier.weight"].ndim != 2:
        raise UserError(f"{where} does not hold {NETWORK_NAMES[network]} weights: {stem_key} and classifier.weight "
                        f"have the wrong number of dimensions")
    C = int(state[stem_key].shape[0])
    if network == "cifar10":
        C //= 3  # the CIFAR stem has 3C channels
    cells = {int(m.group(1)) for k in state if (m := re.match(r"cells\.(\d+)\.", k))}
    return {
        "init_channels": C,
        "layers": max(cells) + 1 if cells else 0,
        "num_classes": int(state["classifier.weight"].shape[0]),
        "auxiliary": any(k.startswith("auxiliary_head.") for k in state),
    }


def resolve_genotype(arch: str | None, loaded: LoadedWeights) -> tuple[Genotype, str]:
    if arch:
        return load_genotype(arch, kind="cnn"), arch  # type: ignore[return-value]
    if loaded.genotype is not None:
        if not isinstance(loaded.genotype, Genotype):
            raise UserError("the weights' metadata holds a recurrent genotype; use dartsnas test ptb")
        return loaded.genotype, "from the weights' metadata"
    return load_genotype("DARTS", kind="cnn"), "DARTS (no --arch given, the weights name none)"  # type: ignore[return-value]


@dataclass
class LoadedCNN:
    model: torch.nn.Module
    loaded: LoadedWeights
    network: str  # 'cifar10' or 'imagenet'
    arch_name: str
    sizes: dict[str, Any]  # init_channels, layers, auxiliary, num_classes


def load_cnn_model(path: str | Path, network: str | None = None, arch: str | None = None, *,
                   init_channels: int | None = None, layers: int | None = None,
                   auxiliary: bool | None = None) -> LoadedCNN:
    """The evaluation network of a weights file (ours, or the authors' released ones), built and loaded.

    ``network`` ('cifar10'/'imagenet') defaults to what the file says, else to what its stem looks
    like; sizes not given are read off the weights.
    """
    loaded = load_weights(path)
    if network is None:
        network = loaded.model if loaded.model in NETWORK_NAMES else (
            "imagenet" if "stem0.3.weight" in loaded.state_dict else "cifar10")
    if loaded.model and loaded.model != network:
        raise UserError(f"{path} holds a {NETWORK_NAMES.get(loaded.model, loaded.model)} network; "
                        f"use dartsnas test {loaded.model}")
    genotype, arch_name = resolve_genotype(arch, loaded)
    found = infer_network(loaded.state_dict, network, str(path))
    given = {"init_channels": init_channels, "layers": layers, "auxiliary": auxiliary}
    sizes = {key: value if value is not None else found[key] for key, value in given.items()}
    sizes["num_classes"] = found["num_classes"]
    try:
        model = build_network(network, genotype, sizes["init_channels"], sizes["layers"], sizes["auxiliary"],
                              found["num_classes"])
    except ValueError as exc:
        raise UserError(f"cannot build the network: {exc}") from None
    load_into(model, loaded.state_dict, what=str(path))
    return LoadedCNN(model, loaded, network, arch_name, sizes)


# -- dartsnas test ------------------------------------------------------------------------------


@dataclass
class TestResult:
    network: str
    loss: float
    top1: float
    top5: float
    images: int
    images_per_s: float
    parameters: int
    parameters_with_auxiliary: int
    source: str
    description: str = ""

    @property
    def error(self) -> float:
        return 100.0 - self.top1

    @property
    def error_top5(self) -> float:
        return 100.0 - self.top5


def run_test(cfg: TestConfig, network: str) -> TestResult:
    """Evaluate the weights of ``cfg.model_path`` on the test split of ``network`` ('cifar10'/'imagenet')."""
    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    assert cfg.model_path is not None
    net = load_cnn_model(cfg.model_path, network, cfg.arch, init_channels=cfg.init_channels, layers=cfg.layers,
                         auxiliary=cfg.auxiliary)
    model, loaded, arch_name, sizes = net.model, net.loaded, net.arch_name, net.sizes
    amp_dtype = resolve_amp(cfg.amp, device)
    channels_last = use_channels_last(cfg.channels_last, device, amp_dtype)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    trained = loaded.config
    stored_batch = trained.get("batch_size")
    if not (isinstance(stored_batch, int) and not isinstance(stored_batch, bool) and stored_batch >= 1):
        stored_batch = None  # damaged metadata: fall back to the default
    batch_size = cfg.batch_size or stored_batch or {"cifar10": 96, "imagenet": 128}[network]
    description = (f"{NETWORK_NAMES[network]}, {sizes['layers']} cells, C={sizes['init_channels']}, "
                   f"architecture {arch_name}")

    record = trained_data(loaded, str(cfg.model_path))
    if record is not None and record.get("source") in ("folder", "python"):
        images, source = folder_test_images(cfg.data or trained.get("data"), record, trained.get("image_size"))
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = cifar_batches(
            images, batch_size, device, mean=tuple(record["mean"]), std=tuple(record["std"]))
    elif network == "cifar10":
        if cfg.data or cfg.test_data:
            images, source = cifar_eval_images(cfg.data, cfg.test_data, download=cfg.download)
        else:
            # No images named: the ones the training run tested on at its end, found by the same rule,
            # so that this reproduces the run's final test number.
            found_images, source = cifar_test_images(trained.get("data"), trained.get("test_data"),
                                                     download=cfg.download, flag="--data")
            assert found_images is not None
            images = found_images
        batches = cifar_batches(images, batch_size, device)
    else:
        from ..data.imagenet import imagenet_wnids, load_image_folder, make_loader, use_standard_labels

        image_size = cfg.image_size or trained.get("image_size") or 224
        folder = load_image_folder(cfg.data or trained.get("data"), image_size, train=False)
        source = str(Path(cfg.data or trained.get("data")) / "val")
        if folder.num_classes < sizes["num_classes"] == len(imagenet_wnids()):
            # Some of ImageNet's class folders: each is scored as its class among the network's 1000.
            use_standard_labels(folder.val, source)
        elif folder.num_classes != sizes["num_classes"]:
            raise UserError(f"{source} has {folder.num_classes} classes but the network predicts "
                            f"{sizes['num_classes']}")
        batches = make_loader(folder.val, batch_size, train=False, workers=cfg.workers, device=device)
    result = evaluate(model, batches, device, amp_dtype, channels_last, cfg.eval_batches)
    if result.images == 0:
        raise UserError(f"{source} holds no test images")
    return TestResult(network, result.loss, result.top1, result.top5, result.images, result.images_per_s,
                      count_network_parameters(model), count_network_parameters(model, auxiliary=True), source,
                      description)


# -- dartsnas info ------------------------------------------------------------------------------


@dataclass
class NetworkInfo:
    parameters: int
    parameters_with_auxiliary: int
    multiply_adds: int
    image_size: int


def network_info(arch: str | Genotype, cfg: InfoConfig) -> NetworkInfo:
    """Parameters (with and without the auxiliary head) and multiply-adds of one image."""
    genotype = load_genotype(arch, kind="cnn")
    defaults = NETWORK_DEFAULTS[cfg.dataset]
    C = cfg.init_channels or defaults["init_channels"]
    layers = cfg.layers or defaults["layers"]
    size = cfg.image_size or defaults["image_size"]
    try:
        model = build_network(cfg.dataset, genotype, C, layers, True,  # type: ignore[arg-type]
                              cfg.num_classes or defaults["num_classes"])
    except ValueError as exc:
        raise UserError(f"cannot build the network: {exc}") from None
    return NetworkInfo(count_network_parameters(model), count_network_parameters(model, auxiliary=True),
                       multiply_adds(model, size), size)
