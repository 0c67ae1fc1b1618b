#!/usr/bin/env bash
# Table 3: maximum sequence length of Mistral-7B, Qwen2-7B and Gemma-2-9B, vanilla vs activation checkpointing vs MsT.
#   bash experiments/table3/run.sh                    # CPU (default): scaled-model search + planner
#   bash experiments/table3/run.sh --device cuda      # full-size models on the GPU you have (random weights)
# Paper (A100 80GB): MsT over vanilla Mistral-7B 12x, Qwen2-7B 18x, Gemma-2-9B 24x (and 8x over AC); lengths not reported.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/bootstrap.sh
export MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
python -m experiments.max_length --table table3 --models mistral-7b qwen2-7b gemma2-9b "$@"
