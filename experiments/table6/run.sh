#!/usr/bin/env bash
# Table 6: training throughput (tokens/s, s/step) of vanilla, activation checkpointing and MsT, plus the larger
# batch MsT fits at equal memory. Paper (A100 80G): Llama3-8B 8K AC b=2 3271 tok/s, MsT b=2 3195, MsT b=8 3386;
# Llama2-7B 4K vanilla 3291, AC 2685, MsT without AC 3115, MsT b=16 3656 (its "TFLOPS" column is tokens/s).
#   bash experiments/table6/run.sh                   # CPU default: scaled models (d=128), round-robin timing, ~3 min
#   bash experiments/table6/run.sh --op-width        # the two chunked ops alone against AC at d = 128 ... 1024 (~2.5 min)
#   bash experiments/table6/run.sh --device cuda     # full-size models, bf16, random weights
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/bootstrap.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"  # run.py sets glibc's mmap threshold: large to time, 64 KiB to search
if [ "${1:-}" = "--op-width" ]; then shift; exec python -m experiments.table6.op_width "$@"; fi  # op_width.py's doc
python -m experiments.table6.run "$@"
