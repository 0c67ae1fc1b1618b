#!/usr/bin/env bash
# Table 2 / Figure 1c: maximum sequence length of Llama3-8B and Llama2-7B, vanilla vs activation checkpointing vs MsT.
#   bash experiments/table2/run.sh                    # CPU (default): scaled-model search + planner, ~4 min on 2 cores
#   bash experiments/table2/run.sh --device cuda      # full-size models on the GPU you have (random weights)
#   bash experiments/table2/run.sh --device cuda --models llama3-8b --weights /path/to/Meta-Llama-3-8B
# Paper (A100 80GB): Llama3-8B MsT 60K (12x vanilla, 4x AC); Llama2-7B MsT 84K (12x vanilla, 1.8x AC).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/bootstrap.sh
export MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"  # exact CPU RSS peaks; see mst/memory/measure.py
python -m experiments.max_length --table table2 --models llama3-8b llama2-7b "$@"
