#!/usr/bin/env bash
# Table 5: maximum sequence length of Llama3-8B with 8-bit / 4-bit quantized weights, with and without MsT.
#   bash experiments/table5/run.sh                    # CPU (default): scaled-model search + full-size planner
#   bash experiments/table5/run.sh --device cuda      # full-size Llama3-8B on the GPU you have (random weights)
# Paper (A100 80GB): 4-bit 28K, MsT 60K, MsT + 8-bit 110K, MsT + 4-bit 140K (8-bit alone: 110K/22, about 5K).
# "k-bit" = frozen bitsandbytes LLM.int8 / NF4 projections + LoRA adapters (HF's QLoRA recipe, checkpointing on):
# strategies ac+int8, ac+nf4 ("standard") and mst+int8, mst+nf4; see experiments/table5/README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/bootstrap.sh
export MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
python -m experiments.max_length --table table5 --models llama3-8b \
  --strategies ac ac+int8 ac+nf4 mst mst+int8 mst+nf4 "$@"
