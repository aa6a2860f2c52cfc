"""Settings of ``dartsnas test ptb|wt2``."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check, option
from .runtime import RuntimeOptions


@dataclass
class TestConfig(RuntimeOptions):
    """Settings of ``dartsnas test ptb|wt2``."""

    __test__ = False  # not a pytest test class, despite the name

    model_path: str = option("", "model file (ours or the authors' ptb_model.pt) or training run directory",
                             group="network")
    data: str | None = option(None, "corpus folder with train.txt, valid.txt, test.txt (default: the one the "
                                    "model was trained on, else data/penn or data/wikitext-2)", group="data")
    arch: str | None = option(None, "architecture for files that do not name one (a plain state_dict)",
                              group="network")
    bptt: int = option(35, "evaluation chunk length", group="evaluation")
    eval_batch_size: int = option(10, "batch size of the validation pass", group="evaluation")
    test_batch_size: int = option(1, "batch size of the test pass (the paper's 1)", group="evaluation")

    def validate(self) -> None:
        check(bool(self.model_path), "pass --model-path FILE (a trained model or the authors' ptb_model.pt)")
        for name in ("bptt", "eval_batch_size", "test_batch_size"):
            check(getattr(self, name) >= 1, f"--{name} must be at least 1, got {getattr(self, name)}")
        super().validate()
