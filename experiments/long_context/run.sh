#!/usr/bin/env bash
# The long-context ladder for Llama3-8B: vanilla -> ... -> model state on the host -> Ulysses x 8, each rung's
# longest trainable sequence beside DeepSpeed ALST's published limits (README.md in this folder).
#   bash experiments/long_context/run.sh                  # CPU (default): full-size planner + scaled measurements
#   bash experiments/long_context/run.sh --quick          # smoke: three rungs measured at d = 64, no full-size searches (~1 min)
#   bash experiments/long_context/run.sh --device cuda    # the device-state rungs measured on this GPU
# Flags: python -m experiments.long_context.ladder --help.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/bootstrap.sh
export MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"  # exact CPU RSS peaks; see mst/memory/measure.py
python -m experiments.long_context.ladder "$@"
