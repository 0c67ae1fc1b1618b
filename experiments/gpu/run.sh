#!/usr/bin/env bash
# Every GPU claim in one run (experiments/gpu/README.md): a. CUDA-only tests + bf16 exactness, b. planner vs measured
# Llama3-8B steps, c. Table 2 max length, d. Table 6 MsT vs AC throughput, e. LM-head at 80K + long-context ladder.
#   bash experiments/gpu/run.sh            # one CUDA GPU: 9 min wall at most; results in experiments/*/results/gpu_*.json
#   bash experiments/gpu/run.sh --smoke    # CPU, tiny shapes, same code paths, < 2 min; results in a temp folder
# Extra flags go to `python -m experiments.gpu.run` (--budget-s, --parts, --out).
# On the GPU this uses the image's python3 (torch, transformers; no network, no venv, the copy not installed): the
# repository root goes on PYTHONPATH, and the wheels carried in .whl/ (experiments/gpu/wheels.sh) are installed to
# /tmp/site, those whose distribution the image lacks. None of them is needed by the parts; what is missing is said.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if [[ " $* " == *" --smoke "* ]]; then
  . scripts/bootstrap.sh
  exec python -m experiments.gpu.run "$@"
fi
missing=()
for wheel in .whl/*.whl; do
  [ -e "$wheel" ] || continue
  dist="$(basename "$wheel" | cut -d- -f1)"
  python3 -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2>/dev/null || missing+=("$wheel")
done
if ((${#missing[@]})); then
  echo "[gpu] installing carried wheels: ${missing[*]}" >&2
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${missing[@]}"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
for module in pytest deepspeed peft bitsandbytes flash_attn; do  # say what this image lacks (run.py records versions)
  python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" && continue
  if [ "$module" = pytest ]; then use="part a is skipped without it"; else use="no part needs it"; fi
  echo "[gpu] $module: not installed ($use)" >&2
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the parts' budget (--budget-s, default 480 s) plus start-up stay under 9 min; past that, stop (finished parts kept)
timeout --kill-after=20 "${MST_GPU_WALL_S:-530}" python3 -m experiments.gpu.run "$@"
