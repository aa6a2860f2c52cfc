"""``benchmarks/fastpaths.py`` (the fast-path checker a GPU session runs) keeps working on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One line per check family; a run that silently skipped a family must not pass.
FAMILIES = ["cnn/channels-last/", "cnn/shared-relu/", "cnn/no-none/", "cnn/steps/", "train/channels-last/",
            "rnn/fused/", "loss/cross-entropy/", "cnn/hvp-fd-vs-exact/", "amp/bfloat16/"]


# Slow: runs the whole fast-path checker (about 35 s); the fast paths themselves are checked by test_architect.py and
# test_ops_*.py.
@pytest.mark.slow
def test_quick_fastpath_check_passes_on_the_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "fastpaths.py"), "--device", "cpu", "--quick", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO, check=False)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "FAIL" not in out.stdout, log[-4000:]
    passed = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("PASS")]
    for family in FAMILIES:
        assert any(name.startswith(family) for name in passed), f"no {family} check ran:\n{log[-4000:]}"
    # Both tiers: exact float64 and float32 against its float64 yardstick.
    assert any("/float64/" in n for n in passed) and any("/float32/" in n for n in passed)
