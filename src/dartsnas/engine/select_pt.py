"""``dartsnas select``: DARTS-PT's perturbation-based selection of the cell from a finished CNN search
(Wang et al., ICLR 2021, section 4, Algorithm 1); the decisions themselves are :mod:`dartsnas.search.pt`.

The selection is a run of the epoch loop (:mod:`.loop`) in its own folder inside the search run,
``RUN_DIR/selection_pt`` (config, log, one metrics line per round, a resumable checkpoint), whose
"epochs" are the rounds of decisions: each round decides one edge (later one node) of each cell type
and then tunes the supernet for ``--epochs_per_edge`` epochs, as the authors' code does. The search's
own files are never changed; the result is ``RUN_DIR/genotype_pt.json``. The search run's lock is held
throughout, so a selection and a search never write in the same run at once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint
from ..data.images import epoch_generator
from ..errors import UserError
from ..genotype import Genotype
from ..rundir import FILE_ONLY, RunDir, write_json
from ..search import pt
from ..settings.select_pt import GENOTYPE_FILE, RESUMABLE_OVERRIDES, SELECTION_DIR, SelectConfig
from ..utils import AverageMeter, accuracy
from . import common
from . import search_cnn as search_engine
from .loop import EpochContext, Job, run_job

logger = logging.getLogger("dartsnas")

COMMAND = "select-pt"


@dataclass
class SelectionResult:
    run_dir: Path  # the search run
    genotype: Genotype
    metrics: list[dict[str, Any]]  # one record per round of decisions


def search_settings(run_dir: str | Path) -> search_engine.SearchConfig:
    """The settings of the CNN search in ``run_dir``, or one line saying why it is not one."""
    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise UserError(f"{run_dir} does not exist; pass the folder of a finished dartsnas search cnn run")
    command = rd.read_config().get("command")
    if command != search_engine.COMMAND:
        raise UserError(f"{run_dir} is a {command!r} run; DARTS-PT selection needs a finished convolutional search "
                        f"(dartsnas search cnn)")
    return search_engine.resume_config(run_dir, {})


def finished_state(run_dir: str | Path) -> dict[str, Any]:
    """The final checkpoint of the CNN search in ``run_dir``, or one line saying why it has none."""
    rd = RunDir(run_dir)
    if not rd.checkpoint.is_file():
        raise UserError(f"{run_dir} has no checkpoints/last.pt: the search never finished an epoch; run it to the "
                        f"end with dartsnas search cnn --resume {run_dir}")
    state = load_checkpoint(rd.checkpoint, search_engine.COMMAND)
    if not state.get("finished") or not rd.genotype.is_file():
        raise UserError(f"{run_dir} holds an unfinished search (after epoch {state.get('epoch')}); finish it with "
                        f"dartsnas search cnn --resume {run_dir}, then select")
    return state


def settings(run_dir: str | Path, given: dict[str, Any]) -> SelectConfig:
    """The settings of a selection in ``run_dir``: those given (over the defaults) for a new one; the
    stored ones, with the changes that do not alter its decisions, for one already begun."""
    where = Path(run_dir) / SELECTION_DIR
    if (where / "config.yaml").is_file():
        return common.resume_config(SelectConfig, COMMAND, where, given, RESUMABLE_OVERRIDES)
    return SelectConfig(**given)


class PTSelection(Job):
    """DARTS-PT as a job of the epoch loop: an "epoch" is a round of decisions and its tuning."""

    kind = COMMAND
    command_line = "select"
    nan_hint = "lower --tune_lr_factor"

    def __init__(self, cfg: SelectConfig, run_dir: Path, search_cfg: search_engine.SearchConfig,
                 search_state: dict[str, Any]):
        super().__init__(cfg)
        self.run_dir = run_dir
        self.search_state = search_state
        self.search = search_engine.CNNSearch(search_cfg)
        self.rounds = pt.schedule(search_cfg.nodes, cfg.seed)

    def prepare(self, resume: str | Path | None) -> None:
        self.search.device = self.device
        self.search.prepare(None)

    def build(self, state: dict[str, Any] | None) -> None:
        search, cfg = self.search, self.cfg
        # The search's data, splits, supernet, optimisers and architect, as its last epoch left them.
        search.rd = RunDir(self.run_dir)
        search.build(self.search_state)
        self.model = model = search.model
        self.primitives = list(model.primitives)
        steps = search.cfg.nodes
        self.projection = (pt.CellProjection(steps), pt.CellProjection(steps))
        model.projection = self.projection
        model.aux_skip_coef = 0.0  # DARTS-'s auxiliary skip has decayed to zero by the end of the search
        # The authors' tuning: a fresh SGD (no momentum carried over) at a tenth of the search's learning rate,
        # cosine-annealed over all the tuning. The same optimiser object, which the architect also holds.
        lr = search.cfg.learning_rate * cfg.tune_lr_factor
        search.w_opt.state.clear()
        for group in search.w_opt.param_groups:
            group["lr"] = group["initial_lr"] = lr
        total = max(1, (len(self.rounds) - 1) * cfg.epochs_per_edge)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            search.w_opt, total, eta_min=min(search.cfg.learning_rate_min, lr))
        if state is not None:
            if state["search_step"] != self.search_state["step"]:
                raise UserError(f"the search in {self.run_dir} has run on since this selection began; move "
                                f"{self.run_dir / SELECTION_DIR} away to select again")
            self.restore(model, state["model"])
            search.w_opt.load_state_dict(state["w_optimizer"])
            search.architect.arch_optimizer.load_state_dict(state["a_optimizer"])  # type: ignore[union-attr]
            self.scheduler.load_state_dict(state["scheduler"])
            for cell, stored in zip(self.projection, state["projection"]):
                restored = pt.CellProjection.from_dict(steps, stored)
                cell.ops, cell.kept = restored.ops, restored.kept

    def describe(self) -> None:
        logger.info("DARTS-PT selection of the search in %s: %d rounds of decisions, %d tuning epochs after each "
                    "but the last", self.run_dir, len(self.rounds), self.cfg.epochs_per_edge)

    def steps_per_epoch(self) -> int:
        return self._tune_steps(0)  # a round's tuning; the last round has none

    def _tune_steps(self, round_: int) -> int:
        if round_ + 1 >= len(self.rounds):  # the last decision completes the cell: nothing left to tune for
            return 0
        steps = self.cfg.epochs_per_edge * len(self.search.train_stream)
        return steps if self.cfg.tune_steps is None else min(steps, self.cfg.tune_steps)

    # -- one round: the decisions, then the tuning ---------------------------------------------------

    def _mixing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixing weights the decisions leave (with DrNAS, the Dirichlet means), held fixed."""
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            normal, reduce = self.model.mixing_weights()
        self.model.train(was_training)
        return normal.detach(), reduce.detach()

    def score(self, mixing: tuple[torch.Tensor, torch.Tensor]) -> pt.Score:
        """The supernet's validation accuracy and loss with these mixing weights. Batch norm uses each
        batch's statistics, as in the authors' code: the running statistics describe the unperturbed
        supernet."""
        loss, acc = search_engine._evaluate(self.model, self.search.eval_stream, self.cfg.eval_batches, mixing,
                                            batch_stats=True)
        return float(acc), float(loss)

    def _cell_scorer(self, weights: tuple[torch.Tensor, torch.Tensor], index: int
                     ) -> Callable[[torch.Tensor], pt.Score]:
        """Scores of the supernet with the weights of one cell type (``index`` 0 normal, 1 reduce) replaced."""
        def evaluate(cell_weights: torch.Tensor) -> pt.Score:
            mixing = list(weights)
            mixing[index] = cell_weights
            return self.score((mixing[0], mixing[1]))
        return evaluate

    def start_epoch(self, epoch: int) -> dict[str, Any]:
        decisions: dict[str, Any] = {}
        for decision in self.rounds[epoch]:
            index = 0 if decision.cell == "normal" else 1
            weights = self._mixing()
            evaluate = self._cell_scorer(weights, index)
            cell = self.projection[index]
            if decision.kind == "op":
                op, scores = pt.select_op(evaluate, weights[index], decision.target, pt.op_candidates(self.primitives),
                                          self.cfg.criterion)
                cell.ops[decision.target] = op
                chosen: Any = self.primitives[op]
                shown = {self.primitives[k]: v for k, v in scores.items()}
            else:
                edges = pt.node_edges(cell.steps)[decision.target]
                kept, scores = pt.select_edges(evaluate, weights[index], edges, 2, self.cfg.criterion)
                cell.kept[decision.target] = kept
                chosen = [edges.index(e) for e in kept]  # as the node's input numbers
                shown = {f"input {edges.index(e)}": v for e, v in scores.items()}
            logger.info("%s cell, %s %d: keep %s; accuracy / loss without each: %s", decision.cell,
                        "edge" if decision.kind == "op" else "node", decision.target, chosen,
                        ", ".join(f"{k} {a:.2f} / {lo:.4f}" for k, (a, lo) in shown.items()))
            decisions[decision.cell] = {"kind": decision.kind, "target": decision.target, "chosen": chosen,
                                        "scores": {k: list(v) for k, v in shown.items()}}
        self.lr = self.scheduler.get_last_lr()[0]
        return {"decisions": decisions}

    def train_epoch(self, epoch: int, ctx: EpochContext) -> dict[str, Any]:
        search, cfg = self.search, self.cfg
        self.loss_m, self.acc_m = loss_m, acc_m = AverageMeter(), AverageMeter()
        total, tuned = self._tune_steps(epoch), 0
        # Sub-epoch k of round r draws its batches as search epoch r * E + k would: seeded, so a resumed
        # selection tunes alike.
        for sub in range(cfg.epochs_per_edge):
            if tuned >= total:
                break
            key = epoch * cfg.epochs_per_edge + sub
            self.lr = self.scheduler.get_last_lr()[0]
            alpha_batches = search.alpha_stream.forever(epoch_generator(cfg.seed, key, 1))
            for x, y in search.train_stream.batches(epoch_generator(cfg.seed, key, 0)):
                if tuned >= total:
                    break
                if cfg.tune_alpha:
                    search.architect.step((x, y), next(alpha_batches), self.lr)
                loss, logits = search_engine.weight_step(self.model, search.w_opt, x, y, search.cfg.grad_clip)
                loss_m.update(loss.item(), y.shape[0])
                acc_m.update(accuracy(logits, y)[0], y.shape[0])
                tuned += 1
                ctx.advance(loss_m.avg, acc=acc_m.avg)
            self.scheduler.step()
        return {"tune_steps": tuned}

    def end_epoch(self, epoch: int, finished: bool) -> dict[str, Any]:
        acc, loss = self.score(self._mixing())
        record = {"valid_acc": acc, "valid_loss": loss, "lr": self.lr}
        if self.loss_m.count:
            record.update(train_loss=self.loss_m.avg, train_acc=self.acc_m.avg)
        return record

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "w_optimizer": self.search.w_opt.state_dict(),
                "a_optimizer": self.search.architect.arch_optimizer.state_dict(),  # type: ignore[union-attr]
                "scheduler": self.scheduler.state_dict(), "search_step": self.search_state["step"],
                "projection": [cell.to_dict() for cell in self.projection]}

    def genotype(self) -> Genotype:
        concat = list(range(2, self.search.cfg.nodes + 2))
        return Genotype(normal=pt.cell_genotype(self.projection[0], self.primitives), normal_concat=concat,
                        reduce=pt.cell_genotype(self.projection[1], self.primitives), reduce_concat=concat)

    def finish(self, resumed_finished: bool) -> SelectionResult:
        assert self.rd is not None
        genotype = self.genotype()
        write_json(self.run_dir / GENOTYPE_FILE, genotype.to_dict())
        logger.info("selected genotype (DARTS-PT) = %s", genotype, extra=FILE_ONLY)
        return SelectionResult(self.run_dir, genotype, self.rd.read_metrics())


def run(run_dir: str | Path, config: SelectConfig | None = None) -> SelectionResult:
    """Select the cell of the finished CNN search in ``run_dir`` by DARTS-PT and write it to
    ``run_dir/genotype_pt.json``; a selection begun before is continued (a finished one only rewrites
    its result). ``config``: None continues a selection begun before with its stored settings; a config
    that would change its decisions is refused with one line."""
    if config is None:
        cfg = settings(run_dir, {})
    else:
        # A selection begun before: its stored settings, which this config may change only where that
        # leaves its decisions alone.
        cfg = settings(run_dir, {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                                 if f.metadata.get("cli", True)})
    cfg.validate()
    search_cfg = search_settings(run_dir)  # before the lock: no lock file goes into a folder that is no search run
    overrides = {k: v for k, v in (("device", cfg.device), ("threads", cfg.threads), ("data", cfg.data))
                 if v is not None}
    search_cfg = dataclasses.replace(search_cfg, **overrides, plots=False)
    rd = RunDir(run_dir)
    rd.lock()  # no search may resume here while the selection reads its checkpoint and writes beside it
    try:
        search_state = finished_state(run_dir)
        where = rd.path / SELECTION_DIR
        # The number of rounds follows from the searched cell; a selection begun before keeps its own folder.
        job_cfg = dataclasses.replace(cfg, epochs=len(pt.schedule(search_cfg.nodes, cfg.seed)), save=str(where))
        resume = where if (where / "checkpoints" / "last.pt").is_file() else None
        return run_job(PTSelection(job_cfg, rd.path, search_cfg, search_state), resume)
    finally:
        rd.unlock()

