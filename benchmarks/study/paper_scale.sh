#!/usr/bin/env bash
# The study at paper scale on a GPU (benchmarks/study/paper.yaml): 27 searches (9 methods x 3 seeds,
# 50 epochs each on full CIFAR-10), then 34 cells (27 searched, 6 random, DARTS_V2) each retrained twice
# for 100 epochs with the paper's evaluation network and tested on the 10,000 test images.
#
#   CIFAR10_DIR=/path/to/cifar-10-batches-py bash benchmarks/study/paper_scale.sh            # everything
#   CIFAR10_DIR=... bash benchmarks/study/paper_scale.sh --only first-order,random           # some groups
#   CIFAR10_DIR=... bash benchmarks/study/paper_scale.sh --smoke                             # a few minutes
#
# Expected cost, from the paper's published figures on a GTX 1080 Ti (docs/darts-facts.md: one search
# about 0.4 GPU-days first order, about 1 GPU-day second order; 600 epochs of the evaluation network
# about 1.5 GPU-days, so 100 epochs about 0.25): 21 first-order-like searches x 0.4 + 6 second-order
# searches x 1 + 68 retrainings x 0.25 = about 31 GPU-days on that card (the exact Hessian-vector
# product costs somewhat more than the finite difference). A current data-centre GPU runs these small
# convolutions several times faster; divide by the speed-up that benchmarks/gpu.sh measures on your
# card against the figures in benchmarks/RESULTS.md. Every stage resumes, so the study can run in
# sittings (--hours H stops launching stages after H hours; run the same command again to continue),
# and --only splits it across machines (one study directory per machine, summaries read separately).
#
# --smoke runs the smallest meaningful part: one first-order search seed for 2 epochs and its cell,
# one random cell and DARTS_V2, each retrained for 2 epochs, in its own directory; its numbers check
# the path and the timing, not the method.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
: "${CIFAR10_DIR:?set CIFAR10_DIR to the CIFAR-10 folder (cifar-10-batches-py, or its parent)}"
PY=${PYTHON:-python}
if [[ "${1:-}" == "--smoke" ]]; then
    shift
    exec "$PY" benchmarks/study/study.py run benchmarks/study/paper.yaml --dir runs/study-paper-smoke \
        --only first-order,random,DARTS_V2 --set search_seeds=[0] --set train_seeds=[0] --set random_cells=1 \
        --set search.epochs=2 --set train.epochs=2 "$@"
fi
exec "$PY" benchmarks/study/study.py run benchmarks/study/paper.yaml --dir runs/study-paper "$@"
