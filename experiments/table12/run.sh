#!/usr/bin/env bash
# Table 12 (distributed MsT): max sequence length vs number of ranks, vanilla Ulysses vs MsT + Ulysses.
#   bash experiments/table12/run.sh                  # CPU default: 1, 2, 4 gloo ranks, scaled Llama-3, 32 MiB/rank
#   bash experiments/table12/run.sh --device cuda --model llama3-8b --ranks 1 2 4 8     # one GPU node, NCCL
#   sbatch slurm/ulysses_scale.sh                    # the same sweep on a SLURM cluster (slurm/README.md)
# Paper: Table 12 numbers not reported; claims max length scales linearly with GPUs. Flags: run.py --help.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
. "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec python -m experiments.table12.run "$@"
