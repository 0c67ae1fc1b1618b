#!/usr/bin/env bash
# Prepare .whl/ (git-ignored) with the packages the lent GPU image lacks, as Python 3.12 x86-64 wheels, so that
# `bash experiments/gpu/run.sh` there (no network) can install them: the device tool's run with carry [".whl"].
#   bash experiments/gpu/wheels.sh          # needs a package registry; 5.6 MiB, seconds
#   bash experiments/gpu/wheels.sh --bnb    # also bitsandbytes (Table 5's 8-bit / 4-bit runs by hand; 41 MiB more)
# The image (torch 2.11 + CUDA 13, transformers 5.17, peft, pytest, matplotlib, tqdm, numpy) runs every part of
# run.sh without these; they let the copy run the DeepSpeed-Ulysses and quantized code paths by hand too.
# deepspeed has no wheel on the registry: its sdist is built here into a pure-python wheel (DS_BUILD_OPS=0: no
# compiled ops, the JIT builds them on first use). run.sh installs only the wheels whose distribution is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
WHL=.whl
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
pin() { grep "^$1==" requirements.txt; }  # the version the CPU stack pins, so both sides run the same code
mkdir -p "$WHL"
rm -f "$WHL"/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHL" \
  "$(pin peft)" hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  $([ "${1:-}" = --bnb ] && pin bitsandbytes)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$WHL" "$(pin deepspeed)"
ls -l "$WHL"
du -sh "$WHL"
