#!/usr/bin/env bash
# Planner vs measured peak memory (CPU by default; --device cuda on a GPU) and the planner's predicted
# Llama3-8B / Llama2-7B max sequence lengths on 80 GB next to the paper's Table 2. See compare.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
python -m experiments.planner.compare "$@"
