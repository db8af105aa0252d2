#!/usr/bin/env bash
# Reproduce the reference run: train, average, quantize, pack, round-trip and score on NPROC processes
# (8 GPUs by default), then add the run to submission.json. Any other setting passes through from the
# environment, e.g. `SEED=1337 NPROC=1 bash run.sh` or `MAX_WALLCLOCK_SECONDS=0 ITERATIONS=500 bash run.sh`.
set -euo pipefail
cd "$(dirname "$0")"

export USE_UNIVERSAL="${USE_UNIVERSAL:-1}"
export UNIVERSAL_UNIQUE_BLOCKS="${UNIVERSAL_UNIQUE_BLOCKS:-3}"
export UNIVERSAL_ITERATIONS="${UNIVERSAL_ITERATIONS:-4}"
export NGRAM_EVAL="${NGRAM_EVAL:-0}"
export KNN_LAMBDA="${KNN_LAMBDA:-0}"
export SEED="${SEED:-42}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export RUN_ID="${RUN_ID:-universal_3x4_seed${SEED}_$(date -u +%Y%m%d_%H%M%S)}"
NPROC="${NPROC:-8}"

status=0
torchrun --standalone --nproc_per_node="$NPROC" train_gpt.py || status=$?
if [ "$status" -ne 0 ]; then
    echo "run.sh: train_gpt.py exited with $status; the log is logs/$RUN_ID.txt" >&2
    exit "$status"
fi
# Scores come from the logs named on each call: pass every seed's log to rebuild a multi-seed entry.
python3 tools/submission.py --update "logs/$RUN_ID.txt"
