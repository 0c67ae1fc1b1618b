#!/usr/bin/env bash
# Idempotent: creates .venv (git-ignored) and installs the pinned CPU stack plus `mst` in editable mode.
# Re-running is a no-op once the stamp matches requirements.txt + pyproject.toml.
# Source it (`. scripts/bootstrap.sh`) to get the venv activated, or run it to just install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MST_VENV:-$ROOT/.venv}"
STAMP="$VENV/.mst-installed"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[bootstrap] installing the pinned stack into $VENV (first run: a few minutes)" >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  # torch alone first so nothing can pull a CUDA build
  "$VENV/bin/python" -m pip install -q "$(grep '^torch==' "$ROOT/requirements.txt")" >&2
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt" >&2
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT" >&2
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"
export WANDB_MODE="${WANDB_MODE:-offline}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
