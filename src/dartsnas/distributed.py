"""Several processes, one run: ``torchrun --nproc_per_node=N -m dartsnas search|train ...``.

torchrun starts N copies of the same command and tells each one who it is through the environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``). :func:`setup` joins the
process group they describe, with NCCL on CUDA and gloo on the CPU.

Without torchrun (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) no process group is created and every
helper here is a no-op that returns its input, so a single process runs exactly the code (and the
arithmetic) it ran before distributed support existed.

The data-parallel recipe the engines follow:

* every process holds the same weights and alphas: they start equal (:func:`broadcast_module`) and
  every gradient is averaged over the processes before it is used (:func:`all_reduce_mean`), so
  the same deterministic optimiser steps keep them equal;
* each global batch is cut into one contiguous slice per process (:func:`shard_bounds`), so the
  processes together see exactly the batch one process would see;
* only the main process (rank 0) writes files, logs and progress bars.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import UserError
from .settings.choices import GLOBAL_BATCH_CHOICES
from .utils import resolve_device

T = TypeVar("T")

def env_world_size() -> int:
    """The number of processes torchrun started (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Whether this process writes the run directory, the log and the progress bars."""
    return rank() == 0


def setup(device_name: str = "auto") -> torch.device:
    """This process's device, after joining torchrun's process group (once per process).

    Each process of a node takes the GPU of its ``LOCAL_RANK``; CPU processes use gloo.
    """
    device = resolve_device(device_name)
    if env_world_size() <= 1:
        return device
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run a single process instead of torchrun")
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if device.index is None:
            if local_world > torch.cuda.device_count():
                raise UserError(f"torchrun started {local_world} processes on this node but PyTorch sees "
                                f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node "
                                f"{torch.cuda.device_count()} or fewer")
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
        # Leave the group cleanly at exit, so that torchrun sees a normal end (and no warning).
        atexit.register(cleanup)
    return device


def cleanup() -> None:
    """Leave the process group (a no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def per_rank_batch(batch_size: int, mode: str, world: int | None = None, flag: str = "--batch_size") -> int:
    """Each process's batch: ``batch_size`` itself (``scale``: the global batch grows with the number
    of processes) or ``batch_size / world`` (``keep``: the global batch stays the single-process one)."""
    world = world_size() if world is None else world
    if mode not in GLOBAL_BATCH_CHOICES:
        raise UserError(f"--global_batch must be one of {', '.join(GLOBAL_BATCH_CHOICES)}, got {mode!r}")
    if mode == "scale" or world == 1:
        return batch_size
    if batch_size % world:
        raise UserError(f"--global_batch keep splits {flag} {batch_size} over {world} processes, but {batch_size} "
                        f"is not divisible by {world}; choose a multiple of {world} or --global_batch scale")
    return batch_size // world


def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """This process's contiguous slice ``[lo, hi)`` of ``n`` items (equal shares when ``world`` divides ``n``)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return r * n // w, (r + 1) * n // w


def shard_columns(data: Tensor) -> Tensor:
    """This process's contiguous block of the columns of a (rows, streams) token tensor."""
    if not is_distributed():
        return data
    lo, hi = shard_bounds(data.shape[1])
    return data[:, lo:hi].contiguous()


def _flat_groups(tensors: Sequence[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


def all_reduce_mean(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The mean of each tensor over the processes (new tensors; the inputs are left alone).

    The tensors are packed into one flat buffer per dtype and device, so that a whole list of
    gradients costs one collective instead of one per tensor. Without a process group the input
    list is returned as it is.
    """
    tensors = list(tensors)
    if not is_distributed() or not tensors:
        return tensors
    out: list[Tensor] = [torch.empty(0)] * len(tensors)
    w = dist.get_world_size()
    for idx in _flat_groups(tensors).values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(flat)
        flat.div_(w)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset:offset + n].view_as(tensors[i])
            offset += n
    return out


def average_gradients(params: Iterable[Tensor]) -> None:
    """Replace every ``.grad`` by its mean over the processes (before clipping and the optimiser step)."""
    if not is_distributed():
        return
    # Every process runs the same code, so the same parameters have gradients everywhere.
    grads = [p.grad for p in params if p.grad is not None]
    for g, mean in zip(grads, all_reduce_mean(grads)):
        g.copy_(mean)


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process (the common starting point)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (batch-norm running statistics) over the processes.

    Each process accumulates running statistics from its own batches; averaging them before an
    evaluation or a checkpoint makes every process evaluate (and save) the same network.
    """
    if not is_distributed():
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    with torch.no_grad():
        for b, mean in zip(bufs, all_reduce_mean(bufs)):
            b.copy_(mean)


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sums of Python numbers over the processes (float64), e.g. a meter's total and count."""
    if not is_distributed():
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every process (picklable objects: paths, numbers, small dicts)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every process.

    A :class:`UserError` raised by ``fn`` is raised on every process, so that no process waits
    forever for one that has stopped (e.g. creating the run directory failed).
    """
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box = [("ok", fn())]
        except UserError as exc:
            box = [("error", str(exc))]
    dist.broadcast_object_list(box, src=0)
    status, payload = box[0]
    if status == "error":
        raise UserError(payload)
    return payload


def fingerprint(tensors: Iterable[Tensor], text: str = "") -> str:
    """A short hash of tensors' exact bytes (and some text): equal only if they are bitwise equal."""
    h = hashlib.sha256(text.encode())
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_same(value: str, what: str) -> None:
    """Stop every process with one clear error when ``value`` (e.g. a hash) differs between them."""
    if not is_distributed():
        return
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        ranks = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise UserError(f"the {len(values)} processes disagree on {what} ({ranks}); their updates diverged, "
                        f"which points at non-deterministic kernels or mismatched data or code on some nodes")


def seed_rank(seed: int, epoch: int) -> None:
    """Reseed this process's global generators for ``epoch`` (several processes only).

    Dropout, drop-path and similar draws must differ between processes (they see different
    samples), and a resumed run must replay them without storing every process's RNG state: a seed
    per (seed, epoch, rank) gives both. A single process keeps the checkpointed generator state.
    """
    if not is_distributed():
        return
    torch.manual_seed((seed * 1_000_003 + epoch * 7919 + (rank() + 1) * 104_729) % (2**63 - 1))


def describe_batch(per_rank: int, unit: str = "batch") -> str:
    """``global batch 128 (2 processes x 64)`` for the start-of-run report."""
    w = world_size()
    return f"global {unit} {per_rank * w} ({w} processes x {per_rank})"


def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    if sync_bn and device.type != "cuda":
        raise UserError("--sync_bn needs CUDA devices (SyncBatchNorm runs on GPUs only); on the CPU each process "
                        "normalises with its own batch statistics, so drop --sync_bn")


def convert_sync_bn(module: nn.Module, sync_bn: bool) -> nn.Module:
    """Batch norm over the global batch (``--sync_bn``) instead of each process's own slice."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module) if sync_bn else module
