#!/usr/bin/env bash
# LSS Transformer (arXiv 2311.02382) vs DeepSpeed-Ulysses vs an all-gather baseline: per-step communication
# (counted at the collective calls), peak memory and time, plus a communication model extrapolated to 144 / 3,456 GPUs.
#   bash experiments/lss/run.sh        # CPU default: 1, 2, 4 gloo ranks, char-level model on KJV bytes (~5 min)
#   bash experiments/lss/run.sh --device cuda --ranks 1 2 4 8 --seq-len 65536 --layers 12 --hidden 768 --heads 12
# Paper: 5.6x faster, 10.2x less memory than NVIDIA sequence parallelism on 144 V100s. Flags: run.py --help.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/bootstrap.sh
bash scripts/get_corpora.sh   # the KJV text the character-level model trains on (idempotent)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m experiments.lss.run "$@"
