"""ImageNet in the ImageFolder layout: ``DIR/train/<class>/*.JPEG`` and ``DIR/val/<class>/*.JPEG``.

Transforms are the authors' (their code, cnn/train_imagenet.py): training uses RandomResizedCrop, horizontal flips
and ColorJitter(0.4, 0.4, 0.4, 0.2); evaluation resizes to 256 and centre-crops 224 (both scale
with ``image_size``). Decoding JPEGs is the bottleneck here, so this path uses a DataLoader with
worker processes, unlike the in-memory CIFAR-10 path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(image_size: int):  # -> torchvision transform
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(image_size: int):  # -> torchvision transform
    from torchvision import transforms

    # 256 / 224: the usual ratio of the resize to the centre crop.
    return transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


@dataclass
class ImageFolderData:
    train: Dataset | None
    val: Dataset
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _split_dir(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_dir():
        raise UserError(f"{root} has no {name}/ folder; the ImageNet data must be laid out as "
                        f"{root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG")
    return path


def image_folder(path: str | os.PathLike[str], transform) -> Dataset:
    """One split as a torchvision ImageFolder, with a one-line error when it has no class folders."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} must hold one folder of images per class ({first})") from None


def check_layout(data: str | os.PathLike[str] | None, train: bool = True) -> Path:
    """Fail early, with the expected layout in the message, when ``train/`` or ``val/`` is missing."""
    if not data:
        raise UserError("ImageNet needs --data DIR (a folder with train/ and val/ subfolders of class folders)")
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"ImageNet folder {root} does not exist")
    if train:
        _split_dir(root, "train")
    _split_dir(root, "val")
    return root


def load_image_folder(data: str | os.PathLike[str] | None, image_size: int, train: bool = True) -> ImageFolderData:
    """The ``train/`` (when ``train``) and ``val/`` splits of an ImageFolder tree.

    Both splits must exist up front, so that a run does not fail after its first epoch.
    """
    root = check_layout(data, train)
    train_dir = _split_dir(root, "train") if train else None
    val_dir = _split_dir(root, "val")
    val = image_folder(val_dir, eval_transform(image_size))
    classes = list(val.classes)  # type: ignore[attr-defined]
    train_set = None
    if train_dir is not None:
        train_set = image_folder(train_dir, train_transform(image_size))
        if list(train_set.classes) != classes:  # type: ignore[attr-defined]
            missing = sorted(set(train_set.classes) ^ set(classes))  # type: ignore[attr-defined]
            raise UserError(f"train/ and val/ of {root} have different class folders (e.g. {missing[0]!r}); "
                            f"both need the same classes for the labels to agree")
    return ImageFolderData(train_set, val, classes)


def make_loader(dataset: Dataset, batch_size: int, train: bool, workers: int, device: torch.device,
                generator: torch.Generator | None = None) -> DataLoader:
    """Batches of one split; ``generator`` fixes the shuffle and the workers' seeds of one epoch."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train, num_workers=workers, generator=generator,
        pin_memory=device.type == "cuda", persistent_workers=False, drop_last=False,
    )


class ShardedBatchSampler(Sampler[list[int]]):
    """One process's share of global batches: its contiguous slice of each batch of ``batch_size``.

    With ``order`` (a permutation drawn from the epoch's generator, the same in every process) the
    processes together see exactly one process's shuffled batches; the last, incomplete global
    batch is dropped so that every process takes the same number of equal steps. Without it (in
    order, for evaluation) every image is used once and a process may get an empty last share,
    which is skipped.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, order: torch.Tensor | None = None):
        self.n, self.batch_size, self.rank, self.world, self.order = n, batch_size, rank, world, order

    def __len__(self) -> int:
        if self.order is not None:
            return self.n // self.batch_size
        return sum(1 for _ in self)

    def __iter__(self):
        order = self.order if self.order is not None else torch.arange(self.n)
        stop = (self.n // self.batch_size) * self.batch_size if self.order is not None else self.n
        for start in range(0, stop, self.batch_size):
            batch = order[start:start + self.batch_size]
            total = len(batch)
            part = batch[self.rank * total // self.world:(self.rank + 1) * total // self.world]
            if len(part):
                yield part.tolist()


def make_sharded_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device, rank: int, world: int,
                        order: torch.Tensor | None, worker_generator: torch.Generator | None = None) -> DataLoader:
    """Like :func:`make_loader` for one of several processes (see :class:`ShardedBatchSampler`);
    ``worker_generator`` seeds this process's workers, hence its augmentation."""
    sampler = ShardedBatchSampler(len(dataset), batch_size, rank, world, order)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, generator=worker_generator,
                      pin_memory=device.type == "cuda", persistent_workers=False)
