#!/usr/bin/env bash
# GPU checks and timings for the speed work, prepared for a session that is lent a CUDA machine for
# a few minutes. Run as-is from anywhere in the repository:
#
#     bash benchmarks/gpu.sh
#
# Under 5 minutes on one H100: the GPU and versions; benchmarks/fastpaths.py --device cuda --compile
# (every fast path against its plain path, float64 and float32, the compiled recurrent node kernels,
# and bf16/fp16 autocast against float32); then short CUDA timings: the CNN search step (batch 64,
# first and second order), the recurrent search and training step (rnn_step.py --steps 2), the
# recurrent search with --compile, the evaluation network's training step, a first-order CNN search
# epoch estimate (median step x 391 steps), the second-order step's peak memory with
# --checkpoint_cells, channels-last for the CNN search step, and the recurrent training step with
# --no-pack_weights. Each part runs under `timeout`
# within a total budget, so one hang cannot eat the rest; a part that no longer fits is skipped.
# All output is also written to
# $OUT/gpu-results.txt (or benchmarks/gpu-results.txt without $OUT), with the benchmarks' JSON
# files next to it, and ends with a summary table.
#
# Settings (environment): GPU_BUDGET_S total seconds (default 270), PYTHON (default python).
# Timings are medians of a few steps after a warm-up step, with torch.cuda.synchronize() around
# each (the benchmarks do it); compare them only with figures from the same kind of card.

set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python}
RESULTS_DIR=${OUT:-benchmarks}
mkdir -p "$RESULTS_DIR"
LOG="$RESULTS_DIR/gpu-results.txt"
BUDGET=${GPU_BUDGET_S:-270}
STEPS_PER_EPOCH=391  # CIFAR-10 search: 25,000 weight-training images / batch 64, rounded up

NAMES=()
STATES=()
TIMES=()

# part NAME LIMIT_S COMMAND...: run COMMAND under timeout (the smaller of LIMIT_S and the budget
# left), record ok / FAILED (rc) / TIMEOUT / skipped and the seconds it took.
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    local lim=$((limit < left ? limit : left))
    echo
    echo "=== $name (limit ${lim} s, ${left} s of the budget left) ==="
    echo "\$ $*"
    if ((lim < 20)); then
        echo "skipped: the budget is spent"
        NAMES+=("$name"); STATES+=("skipped"); TIMES+=(0)
        return
    fi
    local t0=$SECONDS rc=0
    timeout -k 10 "$lim" "$@" || rc=$?
    local state=ok
    if ((rc == 124 || rc == 137)); then
        state="TIMEOUT"
    elif ((rc != 0)); then
        state="FAILED (rc $rc)"
    fi
    echo "--- $name: $state in $((SECONDS - t0)) s"
    NAMES+=("$name"); STATES+=("$state"); TIMES+=($((SECONDS - t0)))
}

main() {
    echo "=== gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
        "$(git diff --quiet 2>/dev/null || echo '(working tree modified)')"
    nvidia-smi -L || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null
    if ! "$PY" -c "import dartsnas" 2>/dev/null; then
        echo "dartsnas is not importable: pip install -e . --no-deps"
        "$PY" -m pip install -q -e . --no-deps || echo "pip install failed"
    fi
    "$PY" - <<'EOF'
import platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
EOF

    part "fastpaths (correctness)" 150 "$PY" benchmarks/fastpaths.py --device cuda --compile
    part "search_step (CNN, batch 64, orders 1,2)" 100 \
        "$PY" benchmarks/search_step.py --device cuda --batches 64 --orders 1,2 --steps 5 \
        --json "$RESULTS_DIR/search_step.json"
    part "rnn_step (search orders 1,2 + train)" 120 \
        "$PY" benchmarks/rnn_step.py --device cuda --steps 2 --json "$RESULTS_DIR/rnn_step.json"
    # The recurrent search with its node kernels compiled (Triton): first step (compiling) and median.
    part "rnn_step --compile (search order 1)" 90 \
        "$PY" benchmarks/rnn_step.py --device cuda --what search --orders 1 --steps 3 --compile \
        --json "$RESULTS_DIR/rnn_step_compile.json"
    part "train_step (DARTS_V2, batch 96, amp auto)" 60 \
        "$PY" benchmarks/train_step.py --device cuda --steps 5 --eval_batches 3 \
        --json "$RESULTS_DIR/train_step.json"
    # Peak GPU memory of the batch-64 second-order step with each cell recomputed in the backward.
    part "search_step --checkpoint_cells (order 2)" 50 \
        "$PY" benchmarks/search_step.py --device cuda --batches 64 --orders 2 --steps 3 --checkpoint_cells \
        --json "$RESULTS_DIR/search_step_ckpt.json"
    # Last, because it is optional: does channels-last help the float32 search step on this GPU?
    part "search_step channels-last on (order 1)" 60 \
        "$PY" benchmarks/search_step.py --device cuda --batches 64 --orders 1 --steps 5 --channels_last on \
        --json "$RESULTS_DIR/search_step_cl.json"
    # Also optional: on CUDA nothing is packed, but the weight gradient is still gathered over the
    # sequence; is that faster than one product per time step here too?
    part "rnn_step train --no-pack (gradient per time step)" 45 \
        "$PY" benchmarks/rnn_step.py --device cuda --what train --steps 3 --no-pack \
        --json "$RESULTS_DIR/rnn_step_nopack.json"

    echo
    echo "=== summary ($SECONDS s in all) ==="
    local args=()
    for i in "${!NAMES[@]}"; do
        args+=("${NAMES[$i]}|${STATES[$i]}|${TIMES[$i]}")
    done
    "$PY" - "$RESULTS_DIR" "$STEPS_PER_EPOCH" "${args[@]}" <<'EOF'
import json
import sys
from pathlib import Path

out, steps_per_epoch, parts = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
print(f"{'part':45s} {'state':16s} {'seconds':>7s}")
for p in parts:
    name, state, secs = p.split("|")
    print(f"{name:45s} {state:16s} {secs:>7s}")


def rows(name):
    try:
        return json.loads((out / name).read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []


print()
print(f"{'timing (CUDA)':45s} {'median':>12s} {'peak GiB':>9s}")
for r in rows("search_step.json"):
    print(f"{'CNN search step, order %d, batch %d' % (r['order'], r['batch']):45s} {r['median_s']:10.4f} s "
          f"{r['peak_gib']:9.2f}")
for r in rows("search_step_cl.json"):
    print(f"{'  same, channels-last on, order %d' % r['order']:45s} {r['median_s']:10.4f} s {r['peak_gib']:9.2f}")
for r in rows("search_step_ckpt.json"):
    print(f"{'  same, --checkpoint_cells, order %d' % r['order']:45s} {r['median_s']:10.4f} s {r['peak_gib']:9.2f}")
for r in rows("rnn_step.json") + rows("rnn_step_compile.json") + rows("rnn_step_nopack.json"):
    if r.get("pack_weights") is False:
        print(f"{'  same, --no-pack_weights':45s} {r['median_s']:10.4f} s {r['peak_gib']:9.2f}")
    elif r["what"] == "search" and r.get("compile"):
        print(f"{'  same, --compile (first step %.1f s)' % r['warmup_s']:45s} {r['median_s']:10.4f} s "
              f"{r['peak_gib']:9.2f}")
    elif r["what"] == "search":
        print(f"{'RNN search step, order %d, batch %d' % (r['order'], r['batch']):45s} {r['median_s']:10.4f} s "
              f"{r['peak_gib']:9.2f}")
    else:
        print(f"{'RNN train step, %d units (%.0f tokens/s)' % (r['nhid'], r['tokens_per_s']):45s} "
              f"{r['median_s']:10.4f} s {r['peak_gib']:9.2f}")
for r in rows("train_step.json"):
    label = f"train step DARTS_V2, cl={r['channels_last']}, amp={r['amp']}"
    print(f"{label:45s} {r['train_step_s']:10.4f} s {r['peak_gib']:9.2f}  "
          f"({r['train_images_per_s']:.0f} img/s, eval {r['eval_images_per_s']:.0f} img/s)")
print()
for r in rows("search_step.json"):
    if r["batch"] == 64:
        minutes = r["median_s"] * steps_per_epoch / 60
        print(f"CNN search epoch estimate, order {r['order']}: {r['median_s']:.4f} s/step x {steps_per_epoch} steps "
              f"= {minutes:.1f} min (without validation)")
EOF
    local bad=0
    for s in "${STATES[@]}"; do
        [[ $s == ok ]] || bad=1
    done
    echo "results: $LOG"
    return $bad
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
