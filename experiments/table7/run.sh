#!/usr/bin/env bash
# Table 7 (convergence): vanilla vs MsT loss curves (fp32, bf16) and AC vs MsT at equal memory (held-out ppl).
#   bash experiments/table7/run.sh                 # CPU default: tiny-llama (13.6M, GPT-2 vocab), ~25 min on 2 cores
#   bash experiments/table7/run.sh --device cuda --model llama3-8b --weights /path/Meta-Llama-3-8B \
#        --data_path /path/LongAlpaca-12k.json    # paper scale (Llama3-8B, AC 8K vs MsT 30K, 10k steps)
# Paper: 2.7x better perplexity at 30K (MsT) than at 8K (activation recomputation) on one A100-80G.
# Needs the corpora and tokenizer once: bash scripts/get_corpora.sh. Other flags: python -m experiments.table7.run --help.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
. "$ROOT/scripts/bootstrap.sh"
bash "$ROOT/scripts/get_corpora.sh"
cd "$ROOT"
exec python -m experiments.table7.run "$@"
