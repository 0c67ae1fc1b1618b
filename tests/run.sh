#!/usr/bin/env bash
# The project's test command (README quick start and .ci/run both call this).
# First use installs the pinned stack into .venv (scripts/bootstrap.sh). Runs every test, slow/distributed/SLURM and
# the figure notebooks included; pass pytest arguments to narrow it, e.g. `bash tests/run.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/bootstrap.sh
exec python -m pytest -q -p no:cacheprovider "$@"
