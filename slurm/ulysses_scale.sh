#!/bin/bash
# Table 12 of the MsT paper under SLURM: max sequence length vs ranks, vanilla Ulysses vs MsT + Ulysses.
# One SLURM task = one rank (= one GPU on a GPU cluster). See slurm/README.md.
#
#   sbatch slurm/ulysses_scale.sh                                      # sweep 1,2,4,8 ranks on one 8-GPU node
#   sbatch --nodes=2 --ntasks-per-node=8 --gres=gpu:8 slurm/ulysses_scale.sh        # up to 16 ranks
#   MST_MODE=point sbatch --ntasks-per-node=4 slurm/ulysses_scale.sh    # one point: all tasks form one SP group
#   sbatch -p debug --gres=none --ntasks-per-node=2 --cpus-per-task=1 slurm/ulysses_scale.sh  # local CPU cluster
#
# Environment (exported to the job by sbatch; all optional):
#   MST_MODE        sweep (ranks MST_RANKS, then the table) | point (all tasks of the job)      [sweep]
#   MST_DEVICE      auto | cuda | cpu (cuda -> NCCL, cpu -> gloo)                               [auto]
#   MST_MODEL       model of the search: an mst.configs name, or "scaled"   [llama3-8b on cuda, scaled on cpu]
#   MST_RANKS       rank counts of the sweep (each <= the job's tasks)       [1 2 4 8 ... up to SLURM_NTASKS]
#   MST_STRATEGIES  vanilla and/or mst                                                      [vanilla mst]
#   MST_BUDGET_MIB  per-rank memory budget                             [32 on cpu, 95% of the GPU on cuda]
#   MST_OUT         results folder                             [experiments/table12/results/slurm-<jobid>]
#   MST_PYTHON      python with mst installed                                       [python on PATH]
#   MASTER_PORT     rendezvous port                                        [20000 + job id % 10000]
#SBATCH --job-name=mst-ulysses
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

die() { echo "ulysses_scale.sh: error: $*" >&2; exit 2; }
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job (SLURM_JOB_ID is unset): submit it with 'sbatch $0'"
command -v scontrol >/dev/null || die "scontrol not found: the SLURM client tools are missing on ${HOSTNAME:-this node}"
command -v srun >/dev/null || die "srun not found: the SLURM client tools are missing on ${HOSTNAME:-this node}"
NTASKS=${SLURM_NTASKS:-}
[ -n "$NTASKS" ] || die "SLURM_NTASKS is unset: request tasks, e.g. sbatch --ntasks-per-node=2"

# sbatch runs a copy of this file from the spool dir: the repository is where the job was submitted from
cd "${SLURM_SUBMIT_DIR:-.}"
[ -f experiments/table12/search.py ] || die "submit from the repository root (no experiments/table12 in $PWD)"
PY=${MST_PYTHON:-python}
command -v "$PY" >/dev/null || die "'$PY' not found: activate the environment before sbatch or set MST_PYTHON"

DEVICE=${MST_DEVICE:-auto}
if [ "$DEVICE" = auto ]; then
  DEVICE=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
fi
case "$DEVICE" in cuda|cpu) ;; *) die "MST_DEVICE must be auto, cuda or cpu, got '$DEVICE'" ;; esac
MODEL=${MST_MODEL:-$([ "$DEVICE" = cuda ] && echo llama3-8b || echo scaled)}
STRATEGIES=${MST_STRATEGIES:-vanilla mst}
OUT=${MST_OUT:-experiments/table12/results/slurm-$SLURM_JOB_ID}
MODE=${MST_MODE:-sweep}
if [ "$MODE" = point ]; then
  RANKS=$NTASKS
elif [ "$MODE" = sweep ]; then
  RANKS=${MST_RANKS:-$(n=1; while [ "$n" -le "$NTASKS" ]; do printf '%s ' "$n"; n=$((n * 2)); done)}
else
  die "MST_MODE must be sweep or point, got '$MODE'"
fi

# Fail before any rank starts: every rank count must fit in the job and split the model's heads
for R in $RANKS; do
  [ "$R" -ge 1 ] 2>/dev/null && [ "$R" -le "$NTASKS" ] || die "rank count '$R' is not within 1..$NTASKS (job tasks)"
done
"$PY" - "$MODEL" $RANKS <<'PY' || die "a world size in [$RANKS] cannot run $MODEL with Ulysses (message above)"
import sys
from experiments.table12.search import build_config
from mst.distributed import validate_sp_config
config = build_config(sys.argv[1])
for ranks in sys.argv[2:]:
    try:
        validate_sp_config(config, int(ranks))
    except ValueError as err:
        sys.exit(f"ulysses_scale.sh: error: world size {ranks}: {err}")
PY

BUDGET=${MST_BUDGET_MIB:-$("$PY" -c 'import sys
from experiments.table12.search import default_budget_mib; print(f"{default_budget_mib(sys.argv[1]):g}")' \
  "$DEVICE" | tail -n1)}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
[ -n "$MASTER_ADDR" ] || die "could not resolve the first host of SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
BASE_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
export MASTER_ADDR OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
unset RANK WORLD_SIZE LOCAL_RANK  # set per task below, from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
echo "job $SLURM_JOB_ID: mode=$MODE device=$DEVICE model=$MODEL ranks=[$RANKS] budget=${BUDGET} MiB" \
     "master=$MASTER_ADDR nodes=$SLURM_JOB_NODELIST out=$OUT"

for R in $RANKS; do
  POINT="$OUT/points/$DEVICE-$MODEL-${BUDGET}MiB-x$R.json"
  # each step gets its own port; rank 0 of a step runs on its first node, which is the job's first node
  MASTER_PORT=$((BASE_PORT + R)) srun --ntasks="$R" --kill-on-bad-exit=1 bash -c \
    'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$0" "$@"' \
    "$PY" -m experiments.table12.search --device "$DEVICE" --model "$MODEL" --budget-mib "$BUDGET" \
    --out "$POINT" --strategies $STRATEGIES
  echo "point $R rank(s): $POINT"
done
if [ "$MODE" = sweep ]; then
  "$PY" -m experiments.table12.run --reuse --device "$DEVICE" --model "$MODEL" --budget-mib "$BUDGET" \
    --ranks $RANKS --strategies $STRATEGIES --out-dir "$OUT" --figures "$OUT"
fi
echo "done: results in $OUT"
