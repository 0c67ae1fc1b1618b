#!/usr/bin/env bash
# Table 4: maximum sequence length WITH gradient accumulation (gradients live through the window; plain AdamW).
#   bash experiments/table4/run.sh                    # CPU (default): scaled-model search + planner
#   bash experiments/table4/run.sh --device cuda      # full-size models on the GPU you have
# Paper (A100 80GB): Llama3-8B AC 8K, MsT 30K (4x AC, 21x vanilla); Llama2-7B MsT 55K.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/bootstrap.sh
export MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
python -m experiments.max_length --table table4 --models llama3-8b llama2-7b --optimizer adamw --accumulation-steps 2 "$@"
