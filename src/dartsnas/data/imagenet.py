"""ImageNet in the ImageFolder layout: ``DIR/train/<class>/*.JPEG`` and ``DIR/val/<class>/*.JPEG``.

Transforms are the authors' (their code, cnn/train_imagenet.py): training uses RandomResizedCrop, horizontal flips
and ColorJitter(0.4, 0.4, 0.4, 0.2); evaluation resizes to 256 and centre-crops 224 (both scale
with ``image_size``). Decoding JPEGs is the bottleneck here, so this path uses a DataLoader with
worker processes, unlike the in-memory CIFAR-10 path.
"""

from __future__ import annotations

import functools
import importlib.resources
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
    classes: list[str]  # by label: the class folders, or the 1000 WordNet ids under the standard index
    standard: bool = False  # whether the labels are the standard ImageNet index

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The WordNet ids of the 1000 ImageNet classes; position = standard class index."""
    text = importlib.resources.files(__package__).joinpath("imagenet_wnids.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def standard_labels(classes: list[str], where: str) -> list[int]:
    """The standard ImageNet index of each class folder, or one line saying why there is none."""
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    foreign = [c for c in classes if c not in index]
    if foreign:
        raise UserError(f"{where} has class folders not named by ImageNet WordNet ids (e.g. {foreign[0]!r}), so they "
                        f"cannot be matched to the classes of a 1000-class ImageNet network; name each folder by its "
                        f"WordNet id (n01440764, ...) or use a network trained on these folders")
    return [index[c] for c in classes]


def use_standard_labels(dataset: Dataset, where: str) -> None:
    """Relabel an ImageFolder split in place with the standard ImageNet index of its class folders."""
    labels = standard_labels(dataset.classes, where)  # type: ignore[attr-defined]
    samples = [(path, labels[target]) for path, target in dataset.samples]  # type: ignore[attr-defined]
    dataset.samples = dataset.imgs = samples  # type: ignore[attr-defined]
    dataset.targets = [target for _, target in samples]  # type: ignore[attr-defined]
    dataset.class_to_idx = {c: labels[i] for c, i in dataset.class_to_idx.items()}  # type: ignore[attr-defined]


def is_standard_tree(classes: list[str]) -> bool:
    """Whether every class folder is named by one of the 1000 ImageNet WordNet ids."""
    known = set(imagenet_wnids())
    return bool(classes) and all(c in known for c in classes)


def _split_dir(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_dir():
        raise UserError(f"{root} has no {name}/ folder; the ImageNet data must be laid out as "
                        f"{root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG")
    return path


def image_folder(path: str | os.PathLike[str], transform, standard: bool = False) -> Dataset:
    """One split as a torchvision ImageFolder, with a one-line error when it has no class folders;
    ``standard``: labelled by the standard ImageNet index of its folders."""
    from torchvision.datasets import ImageFolder

    try:
        dataset = ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} must hold one folder of images per class ({first})") from None
    if standard:
        use_standard_labels(dataset, str(path))
    return dataset


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


def load_image_folder(data: str | os.PathLike[str] | None, image_size: int, train: bool = True,
                      labels: str = "folders") -> ImageFolderData:
    """The ``train/`` (when ``train``) and ``val/`` splits of an ImageFolder tree.

    ``labels``: ``folders`` numbers the class folders in sorted order (train/ and val/ must then hold the same
    ones); ``imagenet`` gives each folder its standard ImageNet index (any subset of the 1000 WordNet ids in
    either split); ``auto`` is ``imagenet`` when every folder is named by an ImageNet WordNet id, else
    ``folders``. On the full 1000-folder tree all three give the same labels. Both splits must exist up
    front, so that a run does not fail after its first epoch.
    """
    root = check_layout(data, train)
    train_dir = _split_dir(root, "train") if train else None
    val_dir = _split_dir(root, "val")
    val = image_folder(val_dir, eval_transform(image_size))
    train_set = image_folder(train_dir, train_transform(image_size)) if train_dir is not None else None
    found = list(val.classes) + (list(train_set.classes) if train_set is not None else [])  # type: ignore[attr-defined]
    standard = labels == "imagenet" or (labels == "auto" and is_standard_tree(found))
    if standard:
        for split, where in ((val, val_dir), (train_set, train_dir)):
            if split is not None:
                use_standard_labels(split, str(where))
        return ImageFolderData(train_set, val, list(imagenet_wnids()), standard=True)
    classes = list(val.classes)  # type: ignore[attr-defined]
    if train_set is not None and list(train_set.classes) != classes:  # type: ignore[attr-defined]
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
