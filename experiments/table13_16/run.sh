#!/usr/bin/env bash
# Tables 13-16: LM-head and MLP time and peak memory vs sequence length S and mini-sequences M, plus the chunk-size
# measurement behind the defaults (MLP C = 2d tokens, LM-head M = ceil(V/d) chunks of at least d/4 tokens).
#   bash experiments/table13_16/run.sh                  # CPU default: scaled ops (k=32) measured + full-size planner, ~15 min
#   bash experiments/table13_16/run.sh --device cuda    # every cell measured at full Llama3-8B shapes in bf16
# Paper (A100, bf16): LM-head at S=80K 59.92 GB unchunked -> 9.12 GB at M=16; MLP 14.72 -> 11.66 GB at M=8 (naive
# loop); at S=1024 LM-head M=32 is 11x slower than standard. Flags: python -m experiments.table13_16.ablation --help.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/bootstrap.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m experiments.table13_16.ablation "$@"
