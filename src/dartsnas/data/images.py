"""Image data held in memory as uint8 tensors, augmented on the device, batch by batch.

CIFAR-10 is 150 MB as uint8, so the whole set lives in one tensor (on the GPU when there is one)
and the paper's augmentation (random crop with zero padding 4, horizontal flip; the authors'
code, cnn/utils.py ``_data_transforms_cifar10``)
is done on whole batches. That removes the DataLoader worker bottleneck of the original code and
makes every batch a pure function of a seeded ``torch.Generator``, which is what makes an
interrupted run resume bit for bit.

Sources:

* ``cifar10``: torchvision's CIFAR-10 folder (downloaded when the network allows), or an ``.npz``
  file of CIFAR-10 images (``x`` uint8 (N, 32, 32, 3), ``y`` (N,)), normalised with the CIFAR-10
  constants.
* ``npz``: any image set in that layout (any size, 1 or 3 channels), normalised with the mean and
  std of its training part.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits, a real data set that needs no network.
* ``folder``: your own images in class sub-folders (:mod:`.folder`), normalised with the mean and std of
  its training part.
"""

from __future__ import annotations

import copy
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..settings.choices import DATASETS
from .download import default_data_dir

CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)


@dataclass
class ImageSet:
    x: torch.Tensor  # uint8, (N, C, H, W)
    y: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device) -> ImageSet:
        return ImageSet(self.x.to(device), self.y.to(device))


@dataclass
class ImageData:
    """A data set in memory plus how to normalise and augment it."""

    name: str
    train: ImageSet
    test: ImageSet | None
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int  # random-crop padding; 0 disables cropping
    flip: bool  # random horizontal flips
    classes: list[str] | None = None  # class names, where the source has them (folders)

    @property
    def in_channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.x.shape[2]), int(self.train.x.shape[3])


# Bounds of what an image file may ask for: class counts far beyond any real data set would size the
# classifier (and its memory) from a typo; a network halves its input twice.
MAX_CLASSES = 100_000
MIN_SIDE = 4


def _from_hwc(x: np.ndarray, where: str) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise UserError(f"{where}: images must be uint8, got {x.dtype}")
    if x.ndim == 3:  # (N, H, W): one channel
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"{where}: images must have shape (N, H, W, C) with C = 1 or 3, got {tuple(x.shape)}")
    if min(x.shape[1:3]) < MIN_SIDE:
        raise UserError(f"{where}: images of {x.shape[1]}x{x.shape[2]} pixels are too small; the networks halve them "
                        f"twice, so each side needs at least {MIN_SIDE} pixels")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _labels(y: np.ndarray, n: int, where: str) -> torch.Tensor:
    if y.ndim != 1 or y.shape[0] != n:
        raise UserError(f"{where}: labels 'y' must have shape ({n},), got {tuple(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{where}: labels must be integers, got {y.dtype}")
    # Compared in the labels' own type: converting first would wrap uint64 values of 2^63 and more.
    if n and y.min() < 0:
        raise UserError(f"{where}: labels must be >= 0")
    if n and y.max() >= MAX_CLASSES:
        raise UserError(f"{where}: labels are class indices 0..C-1 and must be below {MAX_CLASSES:,}; the largest is "
                        f"{int(y.max())}")
    return torch.from_numpy(y.astype(np.int64))


def read_npz(path: str | os.PathLike[str]) -> tuple[ImageSet, ImageSet | None]:
    """Read ``x``/``y`` (and optional ``x_test``/``y_test``) from an ``.npz`` file."""
    where = str(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read {where} as an .npz file ({exc})") from None
    if "x" not in arrays or "y" not in arrays:
        raise UserError(f"{where} must contain arrays 'x' (uint8 images, N x H x W x C) and 'y' (labels)")
    x = _from_hwc(arrays["x"], where)
    train = ImageSet(x, _labels(arrays["y"], x.shape[0], where))
    test = None
    if "x_test" in arrays and "y_test" in arrays:
        if arrays["x_test"].shape[:1] == (0,):
            raise UserError(f"{where}: x_test holds no images; leave x_test and y_test out of the file instead")
        xt = _from_hwc(arrays["x_test"], where + " (x_test)")
        test = ImageSet(xt, _labels(arrays["y_test"], xt.shape[0], where + " (y_test)"))
    if len(train) == 0:
        raise UserError(f"{where} contains no images")
    return train, test


def _load_cifar10_folder(root: Path, download: bool) -> tuple[ImageSet, ImageSet]:
    import torchvision

    exists = (root / "cifar-10-batches-py").is_dir()
    try:
        train = torchvision.datasets.CIFAR10(str(root), train=True, download=download and not exists)
        test = torchvision.datasets.CIFAR10(str(root), train=False, download=False)
    except Exception as exc:  # noqa: BLE001 -- torchvision raises RuntimeError, URLError, OSError... by failure
        reason = "not found" if not download else f"not found and could not be downloaded ({type(exc).__name__})"
        raise UserError(
            f"CIFAR-10 {reason} in {root}; pass --data DIR (a folder holding cifar-10-batches-py) or "
            f"--data FILE.npz, or try the offline demo: dartsnas search cnn --dataset digits"
        ) from None
    return (
        ImageSet(_from_hwc(train.data, str(root)), torch.tensor(train.targets, dtype=torch.int64)),
        ImageSet(_from_hwc(test.data, str(root)), torch.tensor(test.targets, dtype=torch.int64)),
    )


def _digits() -> tuple[ImageSet, ImageSet]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are 0..16; scale to the uint8 range like every other source.
    x = np.clip(digits.images * 16.0, 0, 255).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int64)
    # A fixed, class-balanced 1/6 test split (the order of the bundled set is already mixed).
    test_mask = np.arange(len(y)) % 6 == 5
    return (
        ImageSet(_from_hwc(x[~test_mask], "digits"), torch.from_numpy(y[~test_mask])),
        ImageSet(_from_hwc(x[test_mask], "digits"), torch.from_numpy(y[test_mask])),
    )


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units.

    From exact integer sums over chunks of images, so the memory needed stays small for large sets
    and the result does not depend on how the images are chunked."""
    total = torch.zeros(x.shape[1], dtype=torch.int64)
    squares = torch.zeros(x.shape[1], dtype=torch.int64)
    for start in range(0, x.shape[0], 4096):
        chunk = x[start:start + 4096].to("cpu", torch.int64)
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.square().sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total.double() / n
    var = (squares.double() - total.double() * mean) / max(n - 1, 1)  # the unbiased variance, as torch.std
    std = (var.clamp_min(0).sqrt() / 255.0).clamp_min(1e-3)
    return tuple((mean / 255.0).tolist()), tuple(std.tolist())


def load_image_data(dataset: str, data: str | None = None, download: bool = True,
                    image_size: int | None = None, test: bool = True) -> ImageData:
    """Load a data set by name; see the module docstring for the sources (``image_size``, and ``test=False``
    to leave a folder's ``val/`` unread: folders only)."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if dataset == "folder":
        from .folder import read_image_folder

        found = read_image_folder(data, image_size, test=test)
        mean, std = channel_stats(found.train.x)
        # Crop padding as CIFAR-10's 4 of 32 pixels; photographs may be mirrored.
        pad = max(1, min(found.train.x.shape[2:]) // 8)
        return ImageData(Path(data or "").name, found.train, found.test, len(found.classes), mean, std, pad=pad,
                         flip=True, classes=found.classes)
    if dataset == "digits":
        train, test = _digits()
        mean, std = channel_stats(train.x)
        # Digits must not be mirrored; a one-pixel shift is the analogue of CIFAR's 4 of 32.
        return ImageData("digits", train, test, 10, mean, std, pad=1, flip=False)
    if dataset == "npz":
        if not data:
            raise UserError("--dataset npz needs --data FILE.npz (arrays 'x': N x H x W x C uint8, 'y': labels)")
        if not os.path.isfile(data):
            raise UserError(f"data file {data} does not exist")
        train, test = read_npz(data)
        mean, std = channel_stats(train.x)
        n_cls = int(max(train.y.max().item(), test.y.max().item() if test is not None else 0)) + 1
        h = train.x.shape[2]
        return ImageData(Path(data).stem, train, test, n_cls, mean, std, pad=max(1, h // 8), flip=True)
    # cifar10
    if data and str(data).endswith(".npz"):
        if not os.path.isfile(data):
            raise UserError(f"CIFAR-10 file {data} does not exist; pass an existing .npz or a CIFAR-10 folder")
        train, test = read_npz(data)
        if tuple(train.x.shape[1:]) != (3, 32, 32):
            raise UserError(f"{data} holds images of shape {tuple(train.x.shape[1:])}, not CIFAR-10's 3x32x32; "
                            "use --dataset npz for other image sets")
        if int(train.y.max()) > 9:
            raise UserError(f"{data} has labels above 9; CIFAR-10 has 10 classes (use --dataset npz otherwise)")
    else:
        root = Path(data) if data else default_data_dir("cifar10")
        train, test = _load_cifar10_folder(root, download)
    return ImageData("cifar10", train, test, 10, CIFAR10_MEAN, CIFAR10_STD, pad=4, flip=True)


class Normalizer:
    """uint8 batch -> float batch: (x / 255 - mean) / std, on the batch's device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False):
        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=dtype, device=device))).view(1, -1, 1, 1)
        self.shift = (torch.tensor(mean, dtype=dtype, device=device) / torch.tensor(std, dtype=dtype,
                                                                                     device=device)).view(1, -1, 1, 1)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = x.to(self.dtype) * self.scale - self.shift
        return out.contiguous(memory_format=self.memory_format)


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator, select: slice | None = None,
            total: int | None = None) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, per sample (uint8 in, uint8 out).

    Padding happens on raw pixels, as torchvision pads the image before normalising, so the border
    is black rather than the mean colour.

    With several processes ``x`` is this process's rows ``select`` of a global batch of ``total`` images:
    the random draws are made for the whole global batch (so the generator advances alike in every
    process) and this process keeps its rows, so each image gets the same augmentation whatever the
    number of processes.
    """
    B, _, H, W = x.shape
    n = B if total is None else total
    if pad > 0:
        gen_device = generator.device
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gen_device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gen_device)
        if select is not None:
            dy, dx = dy[select], dx[select]
        dy, dx = dy.to(x.device), dx.to(x.device)
        rows = (dy[:, None] + torch.arange(H, device=x.device)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(W, device=x.device)[None, :])[:, None, None, :]
        batch = torch.arange(B, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = xp[batch, chan, rows, cols]
    if flip:
        mask = torch.rand(n, generator=generator, device=generator.device)
        if select is not None:
            mask = mask[select]
        mask = mask.to(x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """The generator that shuffles and augments one data stream in one epoch.

    Seeding per (seed, epoch, stream) makes epoch ``e`` identical whether or not the run was
    interrupted before it, without saving any iterator state.
    """
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + stream * 104_729) % (2**63 - 1))
    return g


class Stream:
    """What every batch stream shares: shuffled global batches over ``indices``, sharded over processes.

    ``batch_size`` is the global batch. With ``world > 1`` processes, process ``rank`` gets its
    contiguous slice of every global batch: each epoch's permutation (a function of the epoch's
    generator alone) is the same in every process, so the processes together see exactly the
    batches of one process, and a run can resume with another number of processes. Training
    streams then drop the last, incomplete global batch, so that every process takes the same
    number of steps on an equal share (the mean of the processes' gradients is then the gradient
    of the global batch). Subclasses turn each planned batch into tensors (:meth:`sharded_batches`).
    """

    def __init__(self, indices: torch.Tensor, batch_size: int, train: bool, rank: int, world: int):
        self.indices = indices
        self.batch_size = batch_size
        self.train = train
        self.rank = rank
        self.world = world

    @property
    def drop_last(self) -> bool:
        return self.train and self.world > 1

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.indices) // self.batch_size
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def plan(self, generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, int, slice]]:
        """Each batch's indices (this process's rows of it), the global batch's size, and those rows:
        shuffled when ``train`` (needs ``generator``), in order otherwise."""
        if self.train:
            assert generator is not None
            order = self.indices[torch.randperm(len(self.indices), generator=generator)]
        else:
            order = self.indices
        stop = len(self) * self.batch_size if self.drop_last else len(order)
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            total = len(idx)
            rows = slice(None)
            if self.world > 1:
                lo, hi = self.rank * total // self.world, (self.rank + 1) * total // self.world
                rows = slice(lo, hi)
                idx = idx[rows]
            yield idx, total, rows

    def regrouped(self, batch_size: int) -> Stream:
        """The same stream in global batches of ``batch_size`` (a shallow copy: the images are shared)."""
        other = copy.copy(self)
        other.batch_size = batch_size
        return other

    def sharded_batches(self, generator: torch.Generator | None = None
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, slice]]:
        """Like :meth:`batches`, with the global batch's size and this process's rows of it (for
        augmentations drawn per global batch, such as cutout). Evaluation streams may give a
        process no rows of a short last batch."""
        raise NotImplementedError

    def batches(self, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass: shuffled (and augmented) when ``train`` (needs ``generator``), in order otherwise."""
        for x, y, _, _ in self.sharded_batches(generator):
            yield x, y

    def forever(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches: a new shuffle each time the split is exhausted."""
        while True:
            yield from self.batches(generator)


class BatchStream(Stream):
    """Shuffled, augmented, normalised batches over ``indices`` of an in-memory image set (see
    :class:`Stream` for the batches and their sharing among processes)."""

    def __init__(self, images: ImageSet, indices: torch.Tensor, batch_size: int, normalize: Normalizer,
                 pad: int = 0, flip: bool = False, train: bool = True, rank: int = 0, world: int = 1):
        super().__init__(indices, batch_size, train, rank, world)
        self.images = images
        self.normalize = normalize
        self.pad = pad
        self.flip = flip

    def sharded_batches(self, generator: torch.Generator | None = None
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, slice]]:
        device = self.images.x.device
        for idx, total, rows in self.plan(generator):
            idx = idx.to(device)
            x = self.images.x.index_select(0, idx)
            if self.train:
                x = augment(x, self.pad, self.flip, generator, rows, total)  # type: ignore[arg-type]
            yield self.normalize(x), self.images.y.index_select(0, idx), total, rows


def split_indices(n: int, portion: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``portion`` of the training set for the weights, the rest for alpha (paper appendix A.1.1:
    half of the training set is held out; the authors' code, cnn/train_search.py ``--train_portion``)."""
    split = int(np.floor(portion * n))
    return torch.arange(0, split), torch.arange(split, n)
