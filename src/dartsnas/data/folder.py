"""Your own images: a folder of class sub-folders (torchvision's ImageFolder layout), read into memory.

Layouts: ``DIR/<class>/*.png`` (one pool of training images), or ``DIR/train/<class>/...`` plus
``DIR/val/<class>/...`` (the same class folders in both; ``val/`` is the test split of a training
run and is never seen by a search). Classes are the sub-folder names in sorted order, so label ``i``
is the ``i``-th name, as in torchvision's ImageFolder.

Every image is decoded once (Pillow) into RGB, so grey-scale and palette images become three
identical or looked-up channels, and kept as uint8 in one tensor: the same in-memory pipeline as
CIFAR-10 (:mod:`.images`: augmentation on the device, batches a pure function of a seeded
generator), hence the same bit-exact resume. Sizes: the images' own size when they all share it;
otherwise ``image_size`` (N) resizes every image to N x N (bilinear, aspect ratio not kept).
Holding the pixels above :data:`MAX_BYTES` is refused; larger sets are trained from Python with a
streaming ``torch.utils.data.Dataset`` (:mod:`.stream`).

Training images are stored in one fixed shuffled order (seed 0, whatever the run's ``--seed``):
a folder lists its images class by class, and a search splits the first ``--train_portion`` of
them from the rest, which must not separate classes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .images import MIN_SIDE, ImageSet

# Files Pillow reads that torchvision's ImageFolder also accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Pixels held in memory at most (uint8): 4 GiB is 1.4 million 32x32 RGB images or 28,000 at 224x224.
MAX_BYTES = 4 * 2**30


@dataclass
class FolderImages:
    train: ImageSet
    test: ImageSet | None  # the val/ split, when the folder has train/ and val/
    classes: list[str]


def is_split_layout(root: Path) -> bool:
    """Whether ``root`` holds ``train/`` and ``val/`` rather than class folders."""
    return (root / "train").is_dir() and (root / "val").is_dir()


def _listing(folder: Path) -> list[tuple[Path, int]]:
    """Every image of ``folder``'s class sub-folders with its label; refuses anything else in them."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{folder} holds no class folders; put the images of each class in a sub-folder of its own "
                        f"({folder}/<class>/*.png), or train/ and val/ folders laid out so")
    if len(classes) < 2:
        raise UserError(f"{folder} holds one class folder ({classes[0]}); a classifier needs at least two classes")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = 0
        for path in sorted((folder / name).rglob("*")):
            if path.name.startswith(".") or path.is_dir():
                continue  # hidden files (.DS_Store) and nested folders' entries are listed themselves
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise UserError(f"{path} is not an image file (accepted: {', '.join(IMAGE_EXTENSIONS)}); move it "
                                f"out of the class folders")
            files.append((path, label))
            found += 1
        if not found:
            raise UserError(f"class folder {folder / name} holds no images; remove it or add images")
    return files


def _decode(path: Path, image_size: int | None):  # -> PIL.Image
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UserError(f"cannot read {path} as an image ({type(exc).__name__}); fix or remove it") from None
    if image_size is not None and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return img


def _read_split(folder: Path, image_size: int | None, max_bytes: int) -> tuple[ImageSet, list[str], Path]:
    files = _listing(folder)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    first = _decode(files[0][0], image_size)
    w, h = first.size
    need = len(files) * w * h * 3
    if need > max_bytes:
        raise UserError(f"{folder}: {len(files):,} images of {w}x{h} need {need / 2**30:.1f} GiB in memory, above "
                        f"the {max_bytes / 2**30:.1f} GiB that --dataset folder holds; resize them with --image_size, "
                        f"or train from Python with a streaming Dataset (dartsnas.search / dartsnas.train)")
    if min(w, h) < MIN_SIDE:
        raise UserError(f"{files[0][0]} is {w}x{h} pixels; the networks halve their input twice, so each side "
                        f"needs at least {MIN_SIDE} pixels (resize with --image_size)")
    x = np.empty((len(files), h, w, 3), np.uint8)
    for i, (path, _) in enumerate(files):
        img = first if i == 0 else _decode(path, image_size)
        if img.size != (w, h):
            raise UserError(f"images differ in size: {files[0][0]} is {w}x{h} but {path} is {img.size[0]}x"
                            f"{img.size[1]}; pass --image_size N to resize them all to N x N")
        x[i] = np.asarray(img)
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageSet(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), y), classes, files[0][0]


def read_image_folder(data: str | os.PathLike[str] | None, image_size: int | None = None,
                      max_bytes: int = MAX_BYTES, test: bool = True) -> FolderImages:
    """The images of ``data`` (see the module docstring), training images in the fixed shuffled order;
    ``test=False`` leaves ``val/`` unread (a search never looks at it)."""
    if not data:
        raise UserError("--dataset folder needs --data DIR (a folder of class sub-folders, or train/ and val/ "
                        "folders of them)")
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist" if not root.exists() else
                        f"{root} is not a folder; --dataset folder reads a folder of class sub-folders")
    if is_split_layout(root) and not test:
        train, classes, _ = _read_split(root / "train", image_size, max_bytes)
        test_images = None
    elif is_split_layout(root):
        train, classes, first = _read_split(root / "train", image_size, max_bytes)
        test_images, test_classes, first_test = _read_split(root / "val", image_size, max_bytes)
        if test_classes != classes:
            diff = sorted(set(classes) ^ set(test_classes))
            raise UserError(f"train/ and val/ of {root} have different class folders (e.g. {diff[0]!r}); both need "
                            f"the same classes for the labels to agree")
        if test_images.x.shape[2:] != train.x.shape[2:]:
            raise UserError(f"images differ in size: {first} is {train.x.shape[3]}x{train.x.shape[2]} but "
                            f"{first_test} is {test_images.x.shape[3]}x{test_images.x.shape[2]}; pass --image_size "
                            f"N to resize them all to N x N")
    else:
        train, classes, _ = _read_split(root, image_size, max_bytes)
        test_images = None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    return FolderImages(ImageSet(train.x[order], train.y[order]), test_images, classes)
