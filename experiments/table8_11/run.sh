#!/usr/bin/env bash
# Tables 8-11 / Figures 7-11 (memory breakdown and timelines of Llama3-8B at 4K) and Figure 3 (S = 20K, Llama3-8B
# and Gemma-2-9B): vanilla -> + optimizer-in-backward -> + activation checkpointing -> + MsT.
#   bash experiments/table8_11/run.sh                  # CPU default: scaled models (d=128) + full-size planner, ~3 min
#   bash experiments/table8_11/run.sh --device cuda    # full-size models, CUDA memory snapshots (random weights)
# Paper (A100 80G, Llama3-8B 4K): peak 75 -> 74 -> 52 GB, activations 29 -> 29 -> 7 -> 4 GB. Flags: run.py --help.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/bootstrap.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m experiments.table8_11.run "$@"
