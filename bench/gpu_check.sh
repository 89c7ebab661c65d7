#!/usr/bin/env bash
# The GPU checks of issue 19 in one go, for a lent GPU session (at most 9.5 minutes on one H200):
#   1. --size 350m at the preset's micro batch (configs/pretrain-350m.yaml), ours vs the compiled loop
#   2. --size 1b at the preset's micro batch (configs/pretrain-1b.yaml)
#   3. bench/gpu_pretrain.py --smoke: the script itself on CPU, a sweep of two micro batches
#      (last: on a fresh machine DeepSpeed first JIT-builds its CPU collective op, ~1 min)
# Each step's JSON lines (MFU, tokens/s, peak memory, ratio to the compiled baseline) are printed
# to stdout as soon as the step ends, prefixed with the step's name, so a session cut short still
# has the steps before. A step that fails or runs past its limit is reported (its log's tail on
# stderr) and the next one still runs; the exit status is the number of failed steps.
#
#   bash bench/gpu_check.sh                    # uses .venv/bin/python when present, else python3
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#   EXTRA="--attention cudnn" bash bench/gpu_check.sh    # flags for both GPU runs
#   OUT=/some/dir bash bench/gpu_check.sh      # keep the logs there (default: a temporary folder)
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
EXTRA=${EXTRA:-}
OUT=${OUT:-$(mktemp -d)}
failed=0

step() {  # step NAME SECONDS ARGS...: run gpu_pretrain.py with ARGS under a time limit
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): gpu_pretrain.py $*" >&2
    local began=$SECONDS
    if timeout "$limit" "$PYTHON" bench/gpu_pretrain.py "$@" >"$OUT/$name.log" 2>&1; then
        echo "== $name: ok in $((SECONDS - began))s" >&2
    else
        echo "== $name: FAILED (status $?) after $((SECONDS - began))s; the log's tail:" >&2
        tail -n 30 "$OUT/$name.log" >&2
        failed=$((failed + 1))
    fi
    grep '^{"bench"' "$OUT/$name.log" | sed "s/^/$name /"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader >&2 || true
# 5 untimed steps absorb compilation (per block for ours, the whole model for the baseline); 15
# timed steps per side in chunks of 5: three rounds each, the median counts
# shellcheck disable=SC2086
step 350m 210 --size 350m --warmup 5 --steps 15 --chunk 5 $EXTRA
# shellcheck disable=SC2086
step 1b 210 --size 1b --warmup 5 --steps 15 --chunk 5 $EXTRA
DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 step smoke 150 --smoke --micro-batch 2,4
echo "== done; logs in $OUT" >&2
exit "$failed"
