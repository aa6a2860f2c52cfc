"""``dartsnas train cifar10`` / ``train imagenet``: train a searched cell from scratch (paper section 3.2).

``run(CifarTrainConfig(...))`` and ``run(ImageNetTrainConfig(...))`` are the whole job; the command
line and the tests call them too. The defaults are the paper's (paper section 3.2, appendix A.2.1 and A.2.3).

Splits: the network trains on the training set (minus ``--valid_size`` held-out images, which,
when asked for, are evaluated every epoch and decide ``best.safetensors``). The test split
(CIFAR-10 ``test``, ImageNet ``val/``) is evaluated once, with the final weights, after the last
epoch; it never influences training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .. import distributed
from ..checkpoint import save_weights
from ..config import check, to_dict
from ..data.cutout import cutout
from ..data.images import BatchStream, ImageSet, Normalizer, epoch_generator, load_image_data
from ..data.stream import DatasetStream, dataset_info
from ..errors import UserError
from ..genotype import Genotype, load_genotype
from ..models.cnn import NETWORKS, aux_feature_size, build_network, count_network_parameters
from ..ops import fastconv
from ..rundir import FILE_ONLY, RunDir, write_json
from ..settings.train_cnn import CONFIGS, RESUMABLE_OVERRIDES, CifarTrainConfig, ImageNetTrainConfig, TrainConfig
from ..utils import AverageMeter, accuracy
from . import common
from .common import log_distributed, write_figures
from .evaluate_cnn import (
    EvalResult,
    autocast,
    cifar_batches,
    cifar_test_images,
    evaluate,
    resolve_amp,
    use_channels_last,
)
from .loop import EpochContext, Job, run_job

logger = logging.getLogger("dartsnas")

@dataclass
class TrainResult:
    run_dir: Path
    genotype: Genotype
    metrics: list[dict[str, Any]]
    test: EvalResult | None  # final weights on the test split (None when there is none)


# -- data ---------------------------------------------------------------------------------------

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def _holdout(n: int, valid_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out indices; the split is fixed (seed 0) so that runs of any seed share it."""
    if valid_size >= n:
        raise UserError(f"--valid_size {valid_size} leaves no training images out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return order[valid_size:].sort().values, order[:valid_size].sort().values


def _rank_batch(cfg: TrainConfig) -> int:
    """This process's batch (see ``--global_batch``)."""
    batch = distributed.per_rank_batch(cfg.batch_size, cfg.global_batch)
    check(batch >= 2, f"--global_batch keep leaves {batch} image(s) per process; batch norm needs at least 2 "
                      f"(raise --batch_size)")
    return batch


class _CifarData:
    """CIFAR-10, or a folder of your own images, in memory: batches augmented on the device (crop, flip,
    cutout), seeded per epoch.

    Every stream holds global batches; with several processes each takes its slice of each one.
    """

    def __init__(self, cfg: CifarTrainConfig, device: torch.device):
        self.cfg: TrainConfig = cfg
        self.batch = _rank_batch(cfg) * distributed.world_size()
        self.shard = {"rank": distributed.rank(), "world": distributed.world_size()}
        data = load_image_data(cfg.dataset, cfg.data, download=cfg.download, image_size=cfg.image_size)
        self.info, self.source = data, cfg.dataset
        test, self.test_source = data.test, str(cfg.data or "the CIFAR-10 folder")
        if cfg.dataset == "folder":
            self.test_source = str(Path(cfg.data or "") / "val") if test is not None else ""
        elif cfg.test_data or (cfg.data and str(cfg.data).endswith(".npz")):
            test, self.test_source = cifar_test_images(cfg.data, cfg.test_data, cfg.download, required=False)
        self.test_images: ImageSet | None = test
        if test is None:
            logger.warning("no test images %s; the run ends without a test evaluation (%s)",
                           f"in {cfg.data}" if cfg.dataset == "folder" else f"found next to {cfg.data}",
                           "lay the folder out as train/ and val/" if cfg.dataset == "folder"
                           else "pass --test_data FILE.npz")
        self.num_classes = data.num_classes
        self.image_size = min(data.image_size)
        images = data.train.to(device)
        train_idx, valid_idx = _holdout(len(images), cfg.valid_size) if cfg.valid_size else (
            torch.arange(len(images)), torch.arange(0))
        self.device = device
        self.mean, self.std = data.mean, data.std
        normalize = Normalizer(data.mean, data.std, device)
        self.train = BatchStream(images, train_idx, self.batch, normalize, data.pad, data.flip, train=True,
                                 **self.shard)
        self.valid = (BatchStream(images, valid_idx, self.batch, normalize, train=False, **self.shard)
                      if cfg.valid_size else None)
        self.train_size, self.valid_size = len(train_idx), len(valid_idx)

    def __len__(self) -> int:
        return len(self.train)

    def train_batches(self, epoch: int) -> Batches:
        gen = epoch_generator(self.cfg.seed, epoch, 0)
        holes = epoch_generator(self.cfg.seed, epoch, 3)
        for x, y, total, rows in self.train.sharded_batches(gen):
            if getattr(self.cfg, "cutout", False):  # a CIFAR-10 setting; ImageNet-sized Datasets have none
                # Squares drawn for the global batch, this process's rows kept (as for crop and flip).
                x = cutout(x, self.cfg.cutout_length, holes, rows, total)  # type: ignore[attr-defined]
            yield x, y

    def valid_batches(self) -> Batches | None:
        return self.valid.batches() if self.valid is not None else None

    def test_batches(self) -> Batches | None:
        if self.test_images is None:
            return None
        return cifar_batches(self.test_images, self.batch, self.device, **self.shard, mean=self.mean, std=self.std)


class _DatasetData(_CifarData):
    """A user's Datasets (:mod:`dartsnas.data.stream`): ``train_data`` trained on, ``valid_data`` evaluated
    each epoch (deciding best.safetensors; else ``--valid_size`` items held out of ``train_data``, which
    then see its transform), ``test_data`` once at the end. Cutout, when on, is added to the training
    batches; every other augmentation is the Dataset's own."""

    def __init__(self, cfg: TrainConfig, device: torch.device, train_data: Dataset, valid_data: Dataset | None,
                 test_data: Dataset | None, num_classes: int | None):
        self.cfg, self.device, self.source = cfg, device, "python"
        self.batch = _rank_batch(cfg) * distributed.world_size()
        self.info = info = dataset_info(train_data, num_classes)
        self.num_classes, self.image_size = info.num_classes, min(info.image_size)
        shard = {"rank": distributed.rank(), "world": distributed.world_size(), "device": device,
                 "num_classes": info.num_classes, "workers": cfg.workers or 0}
        n = len(train_data)  # type: ignore[arg-type]
        train_idx, valid_idx = (_holdout(n, cfg.valid_size) if cfg.valid_size and valid_data is None
                                else (torch.arange(n), torch.arange(0)))
        self.train = DatasetStream(train_data, train_idx, self.batch, train=True, **shard)
        self.valid = self.test = None
        if valid_data is not None:
            dataset_info(valid_data, info.num_classes, "valid_data")
            self.valid = DatasetStream(valid_data, torch.arange(len(valid_data)), self.batch,  # type: ignore[arg-type]
                                       train=False, what="valid_data", **shard)
        elif len(valid_idx):
            self.valid = DatasetStream(train_data, valid_idx, self.batch, train=False, **shard)
        if test_data is not None:
            dataset_info(test_data, info.num_classes, "test_data")
            self.test = DatasetStream(test_data, torch.arange(len(test_data)), self.batch,  # type: ignore[arg-type]
                                      train=False, what="test_data", **shard)
        self.train_size = len(train_idx)
        self.valid_size = len(self.valid.indices) if self.valid is not None else 0
        self.test_source = f"test_data ({len(self.test.indices)} items)" if self.test is not None else ""

    def test_batches(self) -> Batches | None:
        return self.test.batches() if self.test is not None else None


class _ImageNetData:
    """An ImageFolder tree read by DataLoader workers; the shuffle is seeded per epoch."""

    def __init__(self, cfg: ImageNetTrainConfig, device: torch.device):
        from torch.utils.data import Subset

        from ..data.imagenet import eval_transform, image_folder, load_image_folder

        self.cfg = cfg
        self.device = device
        folder = load_image_folder(cfg.data, cfg.image_size, train=True, labels=cfg.labels)
        assert folder.train is not None
        self.num_classes = folder.num_classes
        self.image_size = cfg.image_size
        self.test_source = str(Path(cfg.data or "") / "val")
        train_set, valid_set = folder.train, None
        n = len(folder.train)  # type: ignore[arg-type]
        if cfg.valid_size:
            train_idx, valid_idx = _holdout(n, cfg.valid_size)
            # Held-out images get the evaluation transform, so they need their own dataset object.
            plain = image_folder(Path(cfg.data or "") / "train", eval_transform(cfg.image_size), folder.standard)
            train_set, valid_set = Subset(folder.train, train_idx.tolist()), Subset(plain, valid_idx.tolist())
        self.train_set, self.valid_set, self.val_set = train_set, valid_set, folder.val
        self.train_size = len(train_set)  # type: ignore[arg-type]
        self.valid_size = len(valid_set) if valid_set is not None else 0
        self.workers = cfg.workers if cfg.workers is not None else min(8, os.cpu_count() or 1)
        self.batch = _rank_batch(cfg) * distributed.world_size()

    def __len__(self) -> int:
        if distributed.is_distributed():
            return self.train_size // self.batch  # the last, incomplete global batch is dropped
        return (self.train_size + self.batch - 1) // self.batch

    def _loader(self, dataset, train: bool, generator: torch.Generator | None = None, epoch: int = 0):
        from ..data.imagenet import make_loader, make_sharded_loader

        if not distributed.is_distributed():
            return make_loader(dataset, self.batch, train, self.workers, self.device, generator)
        # The epoch's permutation is the same in every process; the workers' seeds (the
        # augmentation) differ per process.
        order = torch.randperm(len(dataset), generator=generator) if train else None
        workers_gen = epoch_generator(self.cfg.seed, epoch, 10 + distributed.rank())
        return make_sharded_loader(dataset, self.batch, self.workers, self.device, distributed.rank(),
                                   distributed.world_size(), order, workers_gen)

    def train_batches(self, epoch: int) -> Batches:
        for x, y in self._loader(self.train_set, True, epoch_generator(self.cfg.seed, epoch, 0), epoch):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def valid_batches(self) -> Batches | None:
        return iter(self._loader(self.valid_set, False)) if self.valid_set is not None else None

    def test_batches(self) -> Batches | None:
        return iter(self._loader(self.val_set, False))


# -- run ----------------------------------------------------------------------------------------


def resume_config(run_dir: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The stored config of ``run_dir`` with the allowed ``overrides`` applied."""
    command = RunDir(run_dir).read_config().get("command")  # no config.yaml: one line saying so
    network = next((n for n, c in CONFIGS.items() if f"train-{n}" == command), None)
    if network is None:
        raise UserError(f"{run_dir} is a {command!r} run, not a CIFAR-10 or ImageNet training run; "
                        f"resume it with its own command")
    cfg = common.resume_config(CONFIGS[network], command, run_dir, overrides, RESUMABLE_OVERRIDES)
    if isinstance(cfg, ImageNetTrainConfig) and "labels" not in RunDir(run_dir).read_config().get("config", {}):
        # Runs from before --labels numbered the class folders in sorted order: keep training the same network.
        cfg = dataclasses.replace(cfg, labels="folders")
    return cfg


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               grad_clip: float, auxiliary_weight: float = 0.4, label_smoothing: float = 0.0,
               amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch; returns the (detached) loss and logits."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(x.device, amp_dtype):
        logits, aux_logits = model(x, aux=True)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        if aux_logits is not None:
            # Auxiliary tower (paper section A.2): extra gradient signal for the lower cells.
            loss = loss + auxiliary_weight * F.cross_entropy(aux_logits.float(), y, label_smoothing=label_smoothing)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    return loss.detach(), logits.detach()


def _evaluate(model: torch.nn.Module, batches: Batches, device: torch.device, amp_dtype: torch.dtype | None,
              channels_last: bool, max_batches: int | None) -> EvalResult:
    """:func:`evaluate` on this process's share of each batch, combined over all processes."""
    if not distributed.is_distributed():
        return evaluate(model, batches, device, amp_dtype, channels_last, max_batches)
    # A process's share of a short last batch may be empty.
    result = evaluate(model, ((x, y) for x, y in batches if len(y)), device, amp_dtype, channels_last, max_batches)
    n = result.images
    loss, top1, top5, images = distributed.all_reduce_sum([result.loss * n, result.top1 * n, result.top5 * n, n])
    images = max(images, 1)
    return EvalResult(loss / images, top1 / images, top5 / images, int(images), result.seconds)


def _set_determinism(deterministic: bool, device: torch.device) -> None:
    if device.type == "cuda":
        # cuDNN autotuning picks the fastest kernels per shape, which need not be deterministic.
        torch.backends.cudnn.benchmark = not deterministic
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


class CNNTraining(Job):
    """Training a network from scratch as a job of the epoch loop (:mod:`.loop`)."""

    def __init__(self, cfg: TrainConfig, train_data: Dataset | None = None, valid_data: Dataset | None = None,
                 test_data: Dataset | None = None, num_classes: int | None = None):
        super().__init__(cfg)
        self.kind = cfg.command
        self.command_line = f"train {cfg.network}"
        self.test_result: EvalResult | None = None
        if train_data is None and (valid_data is not None or test_data is not None):
            raise UserError("valid_data and test_data need train_data too")
        self.user_data = (train_data, valid_data, test_data, num_classes) if train_data is not None else None

    def prepare(self, resume: str | Path | None) -> None:
        cfg = self.cfg
        # A resumed run trains the genotype it stored, even if --arch named a file that has changed since.
        stored = RunDir(resume).genotype if resume is not None else None
        genotype = load_genotype(stored if stored is not None and stored.is_file() else cfg.arch, kind="cnn")
        assert isinstance(genotype, Genotype)
        self.genotype = genotype
        resolve_amp(cfg.amp, self.device)
        distributed.check_sync_bn(cfg.sync_bn, self.device)
        _rank_batch(cfg)
        if isinstance(cfg, ImageNetTrainConfig) and self.user_data is None:
            from ..data.imagenet import check_layout

            check_layout(cfg.data)

    def build(self, state: dict[str, Any] | None) -> None:
        cfg, device = self.cfg, self.device
        _set_determinism(cfg.deterministic, device)
        self.amp_dtype = amp_dtype = resolve_amp(cfg.amp, device)
        common.check_resumed_source(state, self.user_data is not None)
        self.data: _CifarData | _ImageNetData
        if self.user_data is not None:
            self.data = _DatasetData(cfg, device, *self.user_data)
        elif isinstance(cfg, ImageNetTrainConfig):
            self.data = _ImageNetData(cfg, device)
        else:
            self.data = _CifarData(cfg, device)
        data = self.data
        # What the classifier was sized for and how its inputs were normalised (CIFAR-sized networks).
        info = getattr(data, "info", None)
        self.data_record = common.data_record(data.source, info) if info is not None else None
        if state is not None and self.data_record is not None:
            common.check_resumed_data(state.get("data"), self.data_record)
        if cfg.auxiliary:
            side = aux_feature_size(cfg.network, data.image_size)
            need = NETWORKS[cfg.network].aux_min_size
            if side < need:
                raise UserError(f"the auxiliary head needs a {need}x{need} feature map but {data.image_size}px "
                                f"images give {side}x{side}; use larger images (--image_size) or --no-auxiliary")
        model = build_network(cfg.network, self.genotype, cfg.init_channels, cfg.layers, cfg.auxiliary,
                              data.num_classes)
        if cfg.flip_conv_backward:
            fastconv.use_flipped_backward(model)
        self.channels_last = use_channels_last(cfg.channels_last, device, amp_dtype)
        self.fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        model = distributed.convert_sync_bn(model.to(device), cfg.sync_bn)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), cfg.learning_rate, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scheduler: torch.optim.lr_scheduler.LRScheduler
        if isinstance(cfg, ImageNetTrainConfig):
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.decay_period, gamma=cfg.gamma)
            self.label_smoothing = cfg.label_smooth
        else:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, cfg.epochs,
                                                                        eta_min=cfg.learning_rate_min)
            self.label_smoothing = 0.0
        # Loss scaling only for float16; bfloat16 has float32's range.
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        self.best_acc = -1.0
        if state is not None:
            self.restore(model, state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.best_acc = state["best_valid_acc"]

    def describe(self) -> None:
        cfg, data, model = self.cfg, self.data, self.model
        assert self.rd is not None
        write_json(self.rd.genotype, self.genotype.to_dict())
        if self.data_record is not None:
            write_json(self.rd.path / "data.json", self.data_record)
        logger.info("genotype = %s", self.genotype)
        logger.info("data: %d training images%s, %d classes; test images: %s", data.train_size,
                    f", {data.valid_size} held out for validation" if data.valid_size else "", data.num_classes,
                    data.test_source or "none")
        logger.info("network: %d cells, C=%d, %s parameters (%s with the auxiliary head) on %s, %s%s",
                    cfg.layers, cfg.init_channels, f"{count_network_parameters(model):,}",
                    f"{count_network_parameters(model, auxiliary=True):,}", self.device,
                    {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[self.amp_dtype],
                    ", channels-last" if self.channels_last else "")

    def start(self) -> None:
        # Several processes: DistributedDataParallel averages the gradients during the backward pass (and
        # starts every process from rank 0's weights). ``model`` stays the plain network for evaluation,
        # drop path and checkpoints.
        self.train_model: torch.nn.Module = self.model
        if distributed.is_distributed():
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        log_distributed(self.data.batch // distributed.world_size(), {"learning rate": self.cfg.learning_rate})

    def steps_per_epoch(self) -> int:
        return len(self.data)

    def start_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        self.lr = self.scheduler.get_last_lr()[0]
        # Scheduled drop path (NASNet): 0 in the first epoch, rising linearly towards drop_path_prob.
        model.drop_path_prob = cfg.drop_path_prob * epoch / cfg.epochs
        distributed.seed_rank(cfg.seed, epoch)  # drop-path masks differ per process, replay on resume
        logger.info("epoch %d/%d lr %.6g drop_path_prob %.4f", epoch + 1, cfg.epochs, self.lr, model.drop_path_prob)
        return {}

    def train_epoch(self, epoch: int, ctx: EpochContext) -> dict[str, Any]:
        cfg = self.cfg
        self.meters = loss_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
        self.model.train()
        images_seen = 0
        t_train = time.perf_counter()
        for i, (x, y) in enumerate(self.data.train_batches(epoch)):
            if i >= ctx.total:
                break
            if x.shape[0] < 2:  # batch norm cannot train on a single image; happens for N % batch == 1
                continue
            x = x.contiguous(memory_format=self.fmt)
            loss, logits = train_step(self.train_model, self.optimizer, x, y, grad_clip=cfg.grad_clip,
                                      auxiliary_weight=cfg.auxiliary_weight, label_smoothing=self.label_smoothing,
                                      amp_dtype=self.amp_dtype, scaler=self.scaler)
            n = y.shape[0]
            images_seen += n
            top1, top5 = accuracy(logits.float(), y, topk=(1, 5))
            step_loss = loss.item()
            loss_m.update(step_loss, n)
            top1_m.update(top1, n)
            top5_m.update(top5, n)
            ctx.advance(loss_m.avg, step_loss=step_loss, lr=self.lr, acc=top1_m.avg, top5=top5_m.avg)
        self.images_seen, self.train_time = images_seen, time.perf_counter() - t_train
        return {}

    def end_epoch(self, epoch: int, finished: bool) -> dict[str, Any]:
        loss_m, top1_m, top5_m = self.meters
        images_seen = self.images_seen
        if distributed.is_distributed():
            # Means over every process's images (equal shares, so also the mean of the means).
            loss_m.sum, top1_m.sum, top5_m.sum, loss_m.count, images_seen = distributed.all_reduce_sum(
                [loss_m.sum, top1_m.sum, top5_m.sum, loss_m.count, images_seen])
            top1_m.count = top5_m.count = loss_m.count
        self.scheduler.step()
        record: dict[str, Any] = {
            "train_loss": loss_m.avg, "train_acc": top1_m.avg, "train_acc_top5": top5_m.avg, "lr": self.lr,
            "drop_path_prob": self.model.drop_path_prob,
            "train_images_per_s": images_seen / max(self.train_time, 1e-9),
        }
        self.improved = False
        valid_batches = self.data.valid_batches()
        if valid_batches is not None:
            valid = self._evaluate(valid_batches)
            record.update(valid.as_record("valid"))
            self.improved = valid.top1 > self.best_acc
            self.best_acc = max(self.best_acc, valid.top1)
        record["best"] = self.improved
        if finished:
            test_batches = self.data.test_batches()
            if test_batches is not None:
                # The only look at the test split: final weights, after training has ended.
                self.test_result = self._evaluate(test_batches)
                record.update(self.test_result.as_record("test"))
        return record

    def _evaluate(self, batches: Batches) -> EvalResult:
        return _evaluate(self.model, batches, self.device, self.amp_dtype, self.channels_last, self.cfg.eval_batches)

    def write_epoch(self, record: dict[str, Any], finished: bool) -> None:
        assert self.rd is not None
        cfg = self.cfg
        meta = {"epoch": str(record["epoch"]), "step": str(record["step"])}
        if self.data_record is not None:
            meta["data"] = json.dumps(self.data_record)
        if record.get("best"):
            save_weights(self.rd.path / "best.safetensors", self.model, cfg.network, self.genotype, to_dict(cfg), meta)
        if finished:
            save_weights(self.rd.path / "final.safetensors", self.model, cfg.network, self.genotype, to_dict(cfg),
                         meta)

    def state(self) -> dict[str, Any]:
        return {"network": self.cfg.network, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "genotype": self.genotype.to_dict(), "best_valid_acc": self.best_acc,
                **({"data": self.data_record} if self.data_record is not None else {})}

    def finish(self, resumed_finished: bool) -> TrainResult:
        assert self.rd is not None
        result = self.test_result
        if resumed_finished:
            # The final test ran in the last epoch; its numbers are in that epoch's metrics line.
            last = (self.rd.read_metrics() or [{}])[-1]
            if "test_acc" in last:
                result = EvalResult(last["test_loss"], last["test_acc"], last.get("test_acc_top5", math.nan), 0, 0.0)
        if result is not None:
            logger.info("test error: %.2f%% (accuracy %.2f%%, top-5 %.2f%%, loss %.4f)%s", 100 - result.top1,
                        result.top1, result.top5, result.loss, f" on {result.images} images" if result.images else "",
                        extra=FILE_ONLY)
        logger.info("run directory: %s", self.rd.path, extra=FILE_ONLY)
        if self.cfg.plots and distributed.is_main() and not resumed_finished:
            write_figures(self.rd.path)
        return TrainResult(self.rd.path, self.genotype, self.rd.read_metrics(), result)


def run(config: TrainConfig | None = None, resume: str | Path | None = None,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None, *, train_data: Dataset | None = None,
        valid_data: Dataset | None = None, test_data: Dataset | None = None,
        num_classes: int | None = None) -> TrainResult:
    """Train a network from scratch; returns the run directory, genotype, metrics and final test result.

    Args:
        config: a ``CifarTrainConfig`` or ``ImageNetTrainConfig`` (ignored when ``resume`` is given
            and ``config.save`` is not that directory: the run's stored settings are used).
        resume: a run directory to continue from its last checkpoint.
        on_epoch_end: called as ``on_epoch_end(epoch, record)`` after each epoch's checkpoint.
        train_data, valid_data, test_data: Datasets of ``(float image C x H x W, label)`` items used
            instead of ``config.data`` (:mod:`dartsnas.data.stream`): trained on, evaluated each epoch
            (deciding ``best.safetensors``) and evaluated once at the end; a run started on them
            resumes only with them.
        num_classes: the class count, when ``train_data`` has no ``classes`` or ``targets``.
    """
    if resume is not None:
        cfg = config if config is not None and config.save == str(resume) else resume_config(resume, {})
    else:
        cfg = config if config is not None else CifarTrainConfig()
    return run_job(CNNTraining(cfg, train_data, valid_data, test_data, num_classes), resume, on_epoch_end)
