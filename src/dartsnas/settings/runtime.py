"""The options every job shares: where it runs, and what it writes while it runs.

``RuntimeOptions`` (device, threads) is the base of every config, the test commands' included;
``RunOptions`` adds what a search or training run writes and how it may be cut short. Their
checks live here once; a job's own ``validate`` adds its checks and calls ``super().validate()``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..config import check, option, split_names
from .choices import GLOBAL_BATCH_CHOICES

# Far above any machine's cores; OpenMP crashes when asked for hundreds of thousands of threads.
MAX_THREADS = 4096
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


@dataclass
class RuntimeOptions:
    device: str = option("auto", "auto, cpu or cuda (cuda:N for one GPU)", group="runtime")
    threads: int | None = option(None, "CPU threads for PyTorch (default: PyTorch's choice)", group="runtime")

    def __post_init__(self) -> None:
        # Lists of names (their defaults are tuples) given by the Python API as "a,b" or a list: one form.
        for f in dataclasses.fields(self):
            if isinstance(f.default, tuple):
                setattr(self, f.name, split_names(getattr(self, f.name)))

    def validate(self) -> None:
        check(self.threads is None or 1 <= self.threads <= MAX_THREADS,
              f"--threads must be between 1 and {MAX_THREADS}, got {self.threads}")
        check(DEVICE.fullmatch(self.device) is not None,
              f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        # Every seed is also numpy's, whose seeds are 32-bit.
        seed = getattr(self, "seed", None)
        check(seed is None or 0 <= seed < 2**32, f"--seed must be between 0 and {2**32 - 1}, got {seed}")
        # Jobs declare ``workers`` themselves: in-memory images want none, image folders several.
        workers = getattr(self, "workers", None)
        check(workers is None or workers >= 0, f"--workers must be >= 0, got {workers}")


# Run options that a resume may change, in every job: where it runs, and options that cut a run short or
# say what it writes. Each job's RESUMABLE_OVERRIDES adds its own to these.
RESUMABLE_RUN_OPTIONS = frozenset({"device", "threads", "max_steps", "limit_train_batches", "log_steps", "tensorboard",
                                   "plots", "report_freq"})


@dataclass
class RunOptions(RuntimeOptions):
    save: str | None = option(None, "run directory (default: runs/<command>-<timestamp>)", group="output")
    max_steps: int | None = option(None, "stop after this many steps in total, writing everything a finished run "
                                         "writes (smoke tests, timing)", group="runtime")
    limit_train_batches: int | None = option(None, "train on at most this many batches per epoch, so that every "
                                                   "epoch's work runs in seconds (smoke tests; default: all)",
                                             group="runtime")
    eval_batches: int | None = option(None, "evaluate at most this many batches each time (default: all)",
                                      group="runtime")
    report_freq: int = option(50, "log training progress every this many steps", group="output")
    log_steps: bool = option(False, "write every training step's loss and learning rate to RUN_DIR/steps.jsonl "
                                    "(and to TensorBoard with --tensorboard)", group="output")
    tensorboard: bool = option(False, "also write TensorBoard event files (needs the tensorboard package)",
                               group="output")
    plots: bool = option(True, "draw figures into the run directory at the end", group="output")
    global_batch: str = option("scale", "scale (each process takes --batch_size, the global batch grows) or keep "
                                        "(the global batch stays --batch_size, split over the processes)",
                               group="distributed", choices=GLOBAL_BATCH_CHOICES)

    def validate(self) -> None:
        check(self.max_steps is None or self.max_steps >= 1, f"--max_steps must be at least 1, got {self.max_steps}")
        check(self.limit_train_batches is None or self.limit_train_batches >= 1,
              f"--limit_train_batches must be at least 1, got {self.limit_train_batches}")
        check(self.eval_batches is None or self.eval_batches >= 1,
              f"--eval_batches must be at least 1, got {self.eval_batches}")
        check(self.report_freq >= 1, f"--report_freq must be at least 1, got {self.report_freq}")
        super().validate()
