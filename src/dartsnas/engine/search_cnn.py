"""``dartsnas search cnn``: the convolutional cell search of paper section 3.1.1.

``run(SearchConfig(...))`` is the whole job (the settings live in :mod:`dartsnas.settings.search_cnn`);
the command line and the tests call it too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .. import distributed
from ..data.images import BatchStream, ImageData, Normalizer, Stream, epoch_generator, load_image_data, split_indices
from ..data.stream import DatasetInfo, DatasetStream, dataset_info, shuffled_split
from ..errors import UserError
from ..flat_sgd import FlatSGD
from ..genotype import from_dict
from ..ops import fastconv
from ..rundir import write_json
from ..search.alpha_noise import adversarial_weights, noise_bound, perturbed_weights
from ..search.architect import Architect, VirtualStep, call_with, frozen
from ..search.beta_decay import beta_decay_loss, beta_decay_weight
from ..search.cnn import SearchNetwork
from ..search.diagnostics import cnn_diagnostics
from ..search.dirichlet import kl_to_uniform
from ..search.early_stop import Tracker, parse_rule
from ..search.hessian import buffers_kept, due, search_eigenvalue
from ..search.robust import aux_skip_coefficient
from ..settings.search_cnn import RESUMABLE_OVERRIDES, SearchConfig
from ..utils import AverageMeter, accuracy
from . import common, evaluate_cnn
from .common import log_distributed
from .loop import EpochContext, run_job
from .search_job import SearchJob, SearchResult

logger = logging.getLogger("dartsnas")

COMMAND = "search-cnn"


def resume_config(run_dir: str | Path, overrides: dict[str, Any]) -> SearchConfig:
    """The stored config of the CNN search in ``run_dir`` with the allowed ``overrides`` applied."""
    return common.resume_config(SearchConfig, COMMAND, run_dir, overrides, RESUMABLE_OVERRIDES)


# A full evaluation with running statistics takes this many training batches per forward (below).
EVAL_GROUPING = 8


def _evaluate(model: SearchNetwork, stream: Stream, max_batches: int | None,
             mixing: tuple[torch.Tensor, torch.Tensor] | None = None, batch_stats: bool = False
             ) -> tuple[float, float]:
    """Mean validation loss and accuracy (percent) over at most ``max_batches`` batches; ``mixing`` replaces
    the network's mixing weights; ``batch_stats`` normalises with each batch's statistics (training-mode
    batch norm) and leaves the running statistics as they were."""
    if not batch_stats and max_batches is None:
        # With running statistics every image is evaluated on its own, so the batch size changes no
        # value, only how many kernel calls the pass takes: a small search network's evaluation at the
        # training batch is mostly per-call cost (the quickstart's: 1.27 s an epoch at batch 32, 0.42 s
        # at 256; benchmarks/RESULTS.md). A forward without a graph holds a few activations at a time,
        # far less than a training step, which keeps every operation's: it fits where training does.
        stream = stream.regrouped(stream.batch_size * EVAL_GROUPING)
    loss_m, acc_m = AverageMeter(), AverageMeter()
    model.train(batch_stats)
    with torch.no_grad(), buffers_kept(model) if batch_stats else contextlib.nullcontext():
        for i, (x, y) in enumerate(stream.batches()):
            if max_batches is not None and i >= max_batches:
                break
            n = y.shape[0]
            if n == 0:  # a process's empty share of a short last batch
                continue
            logits = model(x, mixing)
            loss_m.update(F.cross_entropy(logits, y).item(), n)
            acc_m.update(accuracy(logits, y)[0], n)
    model.train()
    if distributed.is_distributed():
        # Each process evaluated its share: the weighted means over all of them.
        loss_sum, acc_sum, count = distributed.all_reduce_sum([loss_m.sum, acc_m.sum, loss_m.count])
        return loss_sum / max(count, 1), acc_sum / max(count, 1)
    return loss_m.avg, acc_m.avg


# Above this many first-cell operation activations per image (init_channels / partial_channels x height
# x width), the fused cell's grouped convolutions cost more than the kernel calls they save on the CPU: on
# the 2-core AVX-512 machine a first-order step is 1.5x faster fused for the quickstart network (C = 8,
# 8x8 images), as fast at C = 8 and 32x32, and 1.4x slower at the paper's size (C = 16, 32x32);
# benchmarks/RESULTS.md.
FUSE_MAX_ACTIVATIONS = 8192


def use_fused(setting: str, device: torch.device, init_channels: int, image_size: tuple[int, int],
              partial_channels: int = 1) -> bool:
    """Whether the search cell computes the edges leaving each state together (``--fuse_edges``). ``auto``
    fuses small networks on the CPU only: on CUDA the fused cell has not been timed yet. With PC-DARTS's
    partial channels the operations see ``init_channels / K`` channels, so the size that counts is that."""
    if setting in ("on", "off"):
        return setting == "on"
    channels = init_channels / partial_channels
    return device.type == "cpu" and channels * image_size[0] * image_size[1] <= FUSE_MAX_ACTIVATIONS


def use_channels_last(setting: str, device: torch.device) -> bool:
    """The training's choice (:func:`.evaluate_cnn.use_channels_last`) for a search, which runs without
    mixed precision: channels-last on the CPU."""
    return evaluate_cnn.use_channels_last(setting, device, None)


def build_search(cfg: SearchConfig, data: ImageData | DatasetInfo, device: torch.device, dtype: torch.dtype = torch.float32
                 ) -> tuple[SearchNetwork, torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR, Architect]:
    """The search network, its two optimisers (paper appendix A.1.1) and the architect."""
    model = SearchNetwork(cfg.init_channels, data.num_classes, cfg.layers, steps=cfg.nodes, multiplier=cfg.nodes,
                          in_channels=data.in_channels, primitives=cfg.primitives, lean_memory=cfg.lean_memory,
                          checkpoint_cells=cfg.checkpoint_cells, dirichlet=cfg.dirichlet,
                          partial_channels=cfg.partial_channels, edge_normalization=cfg.edge_normalization,
                          aux_skip=cfg.aux_skip > 0,
                          fused=use_fused(cfg.fuse_edges, device, cfg.init_channels, data.image_size,
                                          cfg.partial_channels)).to(device=device, dtype=dtype)
    if cfg.flip_conv_backward:
        fastconv.use_flipped_backward(model)
    model = distributed.convert_sync_bn(model, cfg.sync_bn)
    if use_channels_last(cfg.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    w_opt = FlatSGD(model.weight_parameters(), cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, cfg.epochs, eta_min=cfg.learning_rate_min)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=cfg.arch_learning_rate, betas=(0.5, 0.999),
                             weight_decay=cfg.arch_weight_decay)

    def loss_fn(params: dict[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(call_with(model, params, (x,)), y)

    architect = Architect(
        dict(model.named_weight_parameters()),
        dict(model.named_arch_parameters()),  # alphas, and PC-DARTS's edge betas when on
        loss_fn, a_opt, w_opt, unrolled=cfg.unrolled, hvp=cfg.hvp, hvp_r=cfg.hvp_r,
        virtual=VirtualStep(momentum=cfg.momentum, weight_decay=cfg.weight_decay),
        # Several processes: every gradient the alpha step uses is averaged over them.
        reduce=distributed.all_reduce_mean if distributed.is_distributed() else None,
    )
    return model, w_opt, scheduler, architect


def weight_step(model: SearchNetwork, w_opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                grad_clip: float, mixing: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of the weights with alpha held fixed (no alpha gradient is computed); ``mixing``, when
    given, replaces the network's mixing weights (SDARTS-RS and -ADV, :mod:`dartsnas.search.alpha_noise`)."""
    with frozen(model.arch_parameters()):
        w_opt.zero_grad(set_to_none=True)
        logits = model(x, mixing)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        # The optimiser's own list: the network's weights, without walking its modules again (ms a step).
        params = [p for group in w_opt.param_groups for p in group["params"]]
        distributed.average_gradients(params)  # no-op in a single process
        if isinstance(w_opt, FlatSGD):
            w_opt.clip_grad_norm_(grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        w_opt.step()
    return loss.detach(), logits.detach()


class CNNSearch(SearchJob):
    """The convolutional search as a job of the epoch loop (:mod:`.loop`); ``train_data`` (and optionally
    ``valid_data``, which then trains alpha and is evaluated) replace the configured data set by a
    user's Dataset (:mod:`dartsnas.data.stream`)."""

    kind = COMMAND
    command_line = "search cnn"
    nan_hint = "lower --learning_rate or --arch_learning_rate"

    def __init__(self, cfg: SearchConfig, train_data: Dataset | None = None, valid_data: Dataset | None = None,
                 num_classes: int | None = None):
        super().__init__(cfg)
        if train_data is None and valid_data is not None:
            raise UserError("valid_data needs train_data too")
        self.user_data = (train_data, valid_data, num_classes) if train_data is not None else None

    def prepare(self, resume: str | Path | None) -> None:
        distributed.check_sync_bn(self.cfg.sync_bn, self.device)
        if self.cfg.selection == "pt" and distributed.is_distributed():
            raise UserError("--selection pt runs in one process: leave it out under torchrun and run dartsnas select "
                            "RUN_DIR after the search")
        distributed.per_rank_batch(self.cfg.batch_size, self.cfg.global_batch)  # fail early when it does not divide

    def build(self, state: dict[str, Any] | None) -> None:
        cfg = self.cfg
        # Streams of global batches; with several processes each takes its slice of every batch.
        self.batch = batch = distributed.per_rank_batch(cfg.batch_size, cfg.global_batch) * distributed.world_size()
        common.check_resumed_source(state, self.user_data is not None)
        shard = {"rank": distributed.rank(), "world": distributed.world_size()}
        if self.user_data is not None:
            self._user_streams(batch, shard)
        else:
            self._image_streams(batch, shard)
        self.data_record = common.data_record("python" if self.user_data else cfg.dataset, self.data)
        if state is not None:
            common.check_resumed_data(state.get("data"), self.data_record)
        train_idx, valid_idx = self.train_idx, self.valid_idx
        if len(train_idx) == 0 or len(valid_idx) == 0:
            raise UserError(f"--train_portion {cfg.train_portion} leaves an empty split of the "
                            f"{len(train_idx) + len(valid_idx)} training images; use a value nearer 0.5")
        if len(self.train_stream) == 0 or len(self.alpha_stream) == 0:
            raise UserError(f"the global batch of {batch} images is larger than the {len(train_idx)} / "
                            f"{len(valid_idx)} images of the weight / alpha split; use a smaller --batch_size or "
                            f"--global_batch keep")
        model = self.model
        rule = parse_rule(cfg.early_stop)
        self.stopper = Tracker(rule) if rule is not None else None
        if state is not None:
            self.restore(model, state["model"])
            self.w_opt.load_state_dict(state["w_optimizer"])
            self.architect.arch_optimizer.load_state_dict(state["a_optimizer"])  # type: ignore[union-attr]
            self.scheduler.load_state_dict(state["scheduler"])
            if self.stopper is not None:
                self.stopper.load_state(state.get("early_stop"))
        # The genotype each epoch's diagnostics compare with: the checkpoint's after a resume, else the
        # one the initial alphas derive.
        stored = state.get("genotype") if state is not None else None
        self.previous_genotype = from_dict(stored) if stored is not None else model.genotype()

    def _image_streams(self, batch: int, shard: dict[str, int]) -> None:
        """The in-memory data sets (:mod:`dartsnas.data.images`), augmented on the device."""
        cfg, device = self.cfg, self.device
        # A search never looks at a folder's val/ (the test split): it is not even read.
        self.data = data = load_image_data(cfg.dataset, cfg.data, download=cfg.download, image_size=cfg.image_size,
                                           test=False)
        self.train_idx, self.valid_idx = train_idx, valid_idx = split_indices(len(data.train), cfg.train_portion)
        self.model, self.w_opt, self.scheduler, self.architect = build_search(cfg, data, device)
        images = data.train.to(device)
        normalize = Normalizer(data.mean, data.std, device,
                               channels_last=use_channels_last(cfg.channels_last, device))
        self.train_stream = BatchStream(images, train_idx, batch, normalize, data.pad, data.flip, train=True, **shard)
        self.alpha_stream = BatchStream(images, valid_idx, batch, normalize, data.pad, data.flip, train=True, **shard)
        self.eval_stream = BatchStream(images, valid_idx, batch, normalize, train=False, **shard)

    def _user_streams(self, batch: int, shard: dict[str, int]) -> None:
        """A user's Dataset: split by --train_portion, or the weights on ``train_data`` and alpha on
        ``valid_data``; the items come as the Dataset makes them."""
        cfg, device = self.cfg, self.device
        assert self.user_data is not None
        train_data, valid_data, num_classes = self.user_data
        self.data = data = dataset_info(train_data, num_classes)
        self.model, self.w_opt, self.scheduler, self.architect = build_search(cfg, data, device)
        alpha_data = valid_data if valid_data is not None else train_data
        if valid_data is not None:
            dataset_info(valid_data, data.num_classes, "valid_data")
            self.train_idx, self.valid_idx = torch.arange(len(train_data)), torch.arange(len(valid_data))
        else:
            self.train_idx, self.valid_idx = shuffled_split(len(train_data), cfg.train_portion)
        common_args = {"device": device, "num_classes": data.num_classes, "workers": cfg.workers,
                       "channels_last": use_channels_last(cfg.channels_last, device), **shard}
        self.train_stream = DatasetStream(train_data, self.train_idx, batch, train=True, **common_args)
        what = "valid_data" if valid_data is not None else "train_data"
        self.alpha_stream = DatasetStream(alpha_data, self.valid_idx, batch, train=True, what=what, **common_args)
        self.eval_stream = DatasetStream(alpha_data, self.valid_idx, batch, train=False, what=what, **common_args)

    def describe(self) -> None:
        data, cfg = self.data, self.cfg
        assert self.rd is not None
        write_json(self.rd.path / "data.json", self.data_record)
        logger.info("data: %s, %d images for the weights, %d for alpha, %d classes, input %dx%dx%d", data.name,
                    len(self.train_idx), len(self.valid_idx), data.num_classes, data.in_channels, *data.image_size)
        n_params = sum(p.numel() for p in self.model.weight_parameters())
        logger.info("search network: %d weights (%.2f MB), %s order on %s", n_params, n_params * 4 / 1e6,
                    "second" if cfg.unrolled else "first", self.device)

    def start(self) -> None:
        # The same starting weights and alphas everywhere (they are equal already when seeded alike).
        distributed.broadcast_module(self.model)
        log_distributed(self.batch // distributed.world_size(), {"learning rate": self.cfg.learning_rate,
                                                                 "arch learning rate": self.cfg.arch_learning_rate})

    def steps_per_epoch(self) -> int:
        return len(self.train_stream)

    def start_epoch(self, epoch: int) -> dict[str, Any]:
        self.lr = self.scheduler.get_last_lr()[0]
        logger.info("epoch %d/%d lr %.6g", epoch + 1, self.cfg.epochs, self.lr)
        # DARTS-'s coefficient is a function of the epoch alone, so a resumed run sets the same value.
        self.model.aux_skip_coef = aux_skip_coefficient(self.cfg.aux_skip, epoch, self.cfg.epochs)
        distributed.seed_rank(self.cfg.seed, epoch)
        self._set_alpha_penalty(epoch)
        if self.cfg.hvp_check:
            # DrNAS: one sample for all the losses of the check, from a stream of its own.
            if self.cfg.dirichlet:
                self.model.dirichlet_seed = int(torch.randint(2**62, (1,), generator=epoch_generator(self.cfg.seed,
                                                                                                       epoch, 5)))
            stats = _hvp_check(self.architect, self.train_stream, self.alpha_stream, self.cfg.seed, epoch, self.lr)
            self.model.dirichlet_seed = None
            return stats
        return {}

    def train_epoch(self, epoch: int, ctx: EpochContext) -> dict[str, Any]:
        cfg = self.cfg
        train_gen = epoch_generator(cfg.seed, epoch, 0)
        alpha_batches = self.alpha_stream.forever(epoch_generator(cfg.seed, epoch, 1))
        # SDARTS-RS noise: a stream of its own, so that it shifts no batch and a resumed epoch draws it again.
        noise_gen = epoch_generator(cfg.seed, epoch, 3) if cfg.alpha_noise > 0 else None
        bound = noise_bound(cfg.alpha_noise, epoch, cfg.epochs)
        # SDARTS-ADV: the attack's random starts, a stream of their own too.
        attack_gen = epoch_generator(cfg.seed, epoch, 5) if cfg.alpha_adversarial > 0 else None
        attack_bound = noise_bound(cfg.alpha_adversarial, epoch, cfg.epochs)
        # DrNAS samples: two seeds per step (the alpha step's, shared by all its losses, and the weight step's).
        sample_gen = epoch_generator(cfg.seed, epoch, 4) if cfg.dirichlet else None
        self.loss_m, self.acc_m = loss_m, acc_m = AverageMeter(), AverageMeter()
        for i, (x, y) in enumerate(self.train_stream.batches(train_gen)):
            if i >= ctx.total:
                break
            x_val, y_val = next(alpha_batches)
            if sample_gen is not None:
                alpha_seed, weight_seed = torch.randint(2**62, (2,), generator=sample_gen).tolist()
                self.model.dirichlet_seed = alpha_seed
            # Paper section 2.3 / Alg. 1: update alpha first, then the weights.
            self.architect.step((x, y), (x_val, y_val), self.lr)
            if sample_gen is not None:
                self.model.dirichlet_seed = weight_seed
            mixing = None
            if noise_gen is not None:
                mixing = (perturbed_weights(self.model.alphas_normal, bound, noise_gen),
                          perturbed_weights(self.model.alphas_reduce, bound, noise_gen))
            if attack_gen is not None:
                mixing = self._attack(x, y, attack_bound, attack_gen)
            loss, logits = weight_step(self.model, self.w_opt, x, y, cfg.grad_clip, mixing)
            n, step_loss = y.shape[0], loss.item()
            loss_m.update(step_loss, n)
            acc_m.update(accuracy(logits, y)[0], n)
            ctx.advance(loss_m.avg, step_loss=step_loss, lr=self.lr, acc=acc_m.avg)
        self.model.dirichlet_seed = None
        return {}

    def _attack(self, x: torch.Tensor, y: torch.Tensor, bound: float, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """SDARTS-ADV's mixing weights for this weight step (:func:`adversarial_weights`): the network's
        weights fixed, its batch-norm statistics put back afterwards (the attack's forwards are not
        training steps)."""
        model = self.model

        def loss_of(mixing: list[torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(model(x, (mixing[0], mixing[1])), y)

        with buffers_kept(model), frozen(model.weight_parameters()):
            normal, reduce = adversarial_weights(loss_of, [model.alphas_normal, model.alphas_reduce], bound,
                                                 self.cfg.adversarial_steps, generator)
        return normal, reduce

    def _set_alpha_penalty(self, epoch: int) -> None:
        # Terms of the alpha objective on alpha alone: beta-DARTS' lambda_e * L_Beta (search/beta_decay.py)
        # and DrNAS' KL anchor (search/dirichlet.py). None of them: plain DARTS.
        # Both act on the operation alphas only: the first two architecture parameters (PC-DARTS's edge
        # betas, when on, follow them and get no gradient from these terms).
        cfg = self.cfg
        terms = []
        if cfg.beta_decay > 0:
            beta_weight = beta_decay_weight(cfg.beta_decay, epoch, cfg.epochs)
            terms.append(lambda arch: beta_weight * beta_decay_loss(arch[:2]))
        if cfg.dirichlet_kl > 0:
            terms.append(lambda arch: cfg.dirichlet_kl * kl_to_uniform(arch[:2]))
        self.architect.alpha_penalty = (lambda arch: sum(t(arch) for t in terms)) if terms else None

    def end_epoch(self, epoch: int, finished: bool) -> dict[str, Any]:
        model, loss_m, acc_m = self.model, self.loss_m, self.acc_m
        self.scheduler.step()
        if distributed.is_distributed():
            # Every process must derive the same cell; a mismatch stops the run with one error.
            distributed.check_same(distributed.fingerprint(model.arch_parameters(), str(model.genotype())),
                                   f"the alphas and genotype after epoch {epoch + 1}")
            # Running statistics came from each process's own batches: evaluate and save their mean.
            distributed.average_buffers(model)
            loss_m.sum, loss_m.count, acc_m.sum = distributed.all_reduce_sum([loss_m.sum, loss_m.count, acc_m.sum])
            acc_m.count = loss_m.count
        valid_loss, valid_acc = _evaluate(model, self.eval_stream, self.cfg.eval_batches)
        self.genotype = model.genotype()
        diagnostics = cnn_diagnostics(self.genotype, self.previous_genotype, model.alphas_normal, model.alphas_reduce)
        self.previous_genotype = self.genotype
        return {"train_loss": loss_m.avg, "train_acc": acc_m.avg, "valid_loss": valid_loss, "valid_acc": valid_acc,
                "lr": self.lr, "genotype": self.genotype.to_dict(), **diagnostics, **self.curvature(epoch)}

    def curvature(self, epoch: int) -> dict[str, float]:
        """Every --hessian_eig_every epochs, the dominant eigenvalue of the alpha Hessian of the
        validation loss (R-DARTS section 4) on the first validation batch, the same every time."""
        if not due(self.cfg.hessian_eig_every, epoch):
            return {}
        batch = next(iter(self.eval_stream.batches()))  # in order, unaugmented: no random stream moves
        return {"hessian_eig": search_eigenvalue(self.architect, self.model, batch, self.cfg.seed)}

    def state(self) -> dict[str, Any]:
        return {**self.search_state(), "data": self.data_record, "w_optimizer": self.w_opt.state_dict(),
                "a_optimizer": self.architect.arch_optimizer.state_dict(),  # type: ignore[union-attr]
                "scheduler": self.scheduler.state_dict()}


def run(config: SearchConfig | None = None, resume: str | Path | None = None,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None, *, train_data: Dataset | None = None,
        valid_data: Dataset | None = None, num_classes: int | None = None) -> SearchResult:
    """Search a convolutional cell and return the run directory, final genotype and metrics.

    Args:
        config: the settings (ignored when ``resume`` is given: the run's stored settings are used).
        resume: a run directory to continue from its last checkpoint.
        on_epoch_end: called as ``on_epoch_end(epoch, record)`` after each epoch's checkpoint.
        train_data: a Dataset of ``(float image C x H x W, label)`` items searched on instead of
            ``config.dataset``, split by ``config.train_portion`` unless ``valid_data`` trains alpha
            (:mod:`dartsnas.data.stream`; a run started on one resumes only with one).
        num_classes: the class count, when ``train_data`` has no ``classes`` or ``targets``.
    """
    if resume is not None:
        # A config from resume_config() carries allowed changes (device, threads...); else the stored one.
        cfg = config if config is not None else resume_config(resume, {})
    else:
        cfg = config if config is not None else SearchConfig()
    result: SearchResult = run_job(CNNSearch(cfg, train_data, valid_data, num_classes), resume, on_epoch_end)
    if cfg.selection == "pt":
        # DARTS-PT after the search, on the finished run (its own command: dartsnas select).
        from . import select_pt

        given = {k: v for k, v in (("device", cfg.device), ("threads", cfg.threads)) if v is not None}
        result.selected = select_pt.run(result.run_dir, select_pt.settings(result.run_dir, given)).genotype
    return result


def _hvp_check(architect: Architect, train_stream: Stream, alpha_stream: Stream, seed: int, epoch: int,
               lr: float) -> dict[str, float]:
    # A separate generator, so that the check does not shift the batches the search itself sees.
    gen = epoch_generator(seed, epoch, 2)
    batch_t = next(iter(train_stream.batches(gen)))
    batch_v = next(iter(alpha_stream.batches(gen)))
    stats = architect.hvp_agreement(batch_t, batch_v, lr)
    logger.info("hvp check: cosine(finite difference, exact) = %.4f, implicit term = %.1f%% of the gradient norm",
                stats["hvp_cosine"], 100 * stats["implicit_ratio"])
    return stats
