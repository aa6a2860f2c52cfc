"""A user's ``torch.utils.data.Dataset`` as the batch streams of a search or a training run.

The Dataset's items are ``(image, label)``: a float tensor C x H x W exactly as the network should see
it (the Dataset's own transform normalises and augments; nothing is added here, except cutout when a
training run asks for it) and an integer class index. Images are read through a DataLoader, so the
set need not fit in memory.

The order of each epoch is a function of the epoch's seeded generator (as for the in-memory streams
of :mod:`.images`), so a resumed run sees the same batches. Whether it sees the same pixels is the
Dataset's affair: with ``workers`` 0 its random transforms draw from torch's global generator, which
a run's checkpoint restores, so a Dataset whose items depend only on the index and that generator
resumes bit for bit; anything else (its own generators, worker processes, files that change) resumes
at the epoch boundary with other draws.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from .images import Stream


@dataclass
class DatasetInfo:
    """What a network needs to know of a user's data (the attributes of :class:`~.images.ImageData` the
    engines read)."""

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    classes: list[str] | None


def dataset_info(dataset: Dataset, num_classes: int | None, what: str = "train_data") -> DatasetInfo:
    """Channels and size from the first item; the class count from ``num_classes``, else the Dataset's
    ``classes`` (torchvision's ImageFolder and data sets) or ``targets``."""
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise UserError(f"{what} must be a map-style Dataset (with __len__ and __getitem__), got "
                        f"{type(dataset).__name__}") from None
    if n == 0:
        raise UserError(f"{what} holds no items")
    image, _ = check_item(dataset[0], what)
    classes = getattr(dataset, "classes", None)
    classes = [str(c) for c in classes] if isinstance(classes, (list, tuple)) else None
    if num_classes is None:
        if classes is not None:
            num_classes = len(classes)
        elif getattr(dataset, "targets", None) is not None:
            num_classes = int(max(int(t) for t in dataset.targets)) + 1  # type: ignore[attr-defined]
        else:
            raise UserError(f"{what} has neither .classes nor .targets; pass num_classes=N")
    if num_classes < 2:
        raise UserError(f"{what} has {num_classes} class(es); a classifier needs at least two")
    return DatasetInfo(type(dataset).__name__, num_classes, int(image.shape[0]),
                       (int(image.shape[1]), int(image.shape[2])), classes)


def check_item(item: Any, what: str) -> tuple[torch.Tensor, int]:
    """One item, or one line saying what an item must be."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise UserError(f"{what} items must be (image, label) pairs, got {type(item).__name__}")
    image, label = item
    if not (isinstance(image, torch.Tensor) and image.is_floating_point() and image.ndim == 3):
        got = (f"a {image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor)
               else f"a {type(image).__name__}")
        raise UserError(f"{what} images must be float tensors C x H x W (e.g. transforms.ToTensor() and "
                        f"Normalize in the Dataset's transform), got {got}")
    return image, int(label)


class DatasetStream(Stream):
    """Batches over ``indices`` of a Dataset, shuffled and sharded as :class:`~.images.Stream` says."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor, batch_size: int, device: torch.device,
                 num_classes: int, train: bool = True, rank: int = 0, world: int = 1, workers: int = 0,
                 channels_last: bool = False, what: str = "train_data"):
        super().__init__(indices, batch_size, train, rank, world)
        self.dataset, self.device, self.num_classes, self.workers = dataset, device, num_classes, workers
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.what = what

    def sharded_batches(self, generator: torch.Generator | None = None
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, slice]]:
        plan = list(self.plan(generator))
        if not plan:
            return
        # Worker processes (if any) are seeded from the epoch's generator, so their draws repeat too.
        seed = int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else 0
        loader = DataLoader(self.dataset, batch_sampler=[idx.tolist() for idx, _, _ in plan if len(idx)],
                            num_workers=self.workers, generator=torch.Generator().manual_seed(seed),
                            pin_memory=self.device.type == "cuda")
        batches = iter(loader)
        for idx, total, rows in plan:
            if not len(idx):  # this process's empty share of a short last batch
                empty = torch.empty(0, dtype=torch.int64, device=self.device)
                yield torch.empty(0, device=self.device), empty, total, rows
                continue
            x, y = next(batches)
            if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
                check_item(self.dataset[int(idx[0])], self.what)  # names what the items are
            y = torch.as_tensor(y, dtype=torch.int64)
            bad = y[(y < 0) | (y >= self.num_classes)]
            if bad.numel():
                raise UserError(f"{self.what} has label {int(bad[0])}, outside 0..{self.num_classes - 1}; pass "
                                f"num_classes=N for N classes")
            x = x.to(self.device, torch.float32, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield x, y.to(self.device, non_blocking=True), total, rows


def shuffled_split(n: int, portion: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``portion`` of a fixed shuffle (seed 0) for the weights, the rest for alpha: a user's
    Dataset may list its items class by class, which a split in order would keep apart."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    split = int(portion * n)
    return order[:split], order[split:]
