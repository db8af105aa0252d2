#!/usr/bin/env bash
# Every GPU figure of train_gpt.py on one GPU in about 5 minutes: compile time, ms per 786,432-token
# step, tokens/s, model FLOP utilisation and peak memory of the seed and plain 11-layer configurations;
# then one sliding-window chunk and one GPTQ pass, projected to the full validation set on 8 GPUs.
# Set DATA_PATH to time the evaluation on real validation tokens (random tokens otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 tools/bench.py step --configs seed,plain11 --steps 6 --warmup 2
python3 tools/bench.py eval ${DATA_PATH:+--data "$DATA_PATH"} --windows 2048
python3 tools/bench.py quant
