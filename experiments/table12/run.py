"""Table 12 (MsT paper, App. E): maximum sequence length vs number of ranks, vanilla Ulysses vs MsT + Ulysses.

    bash experiments/table12/run.sh                                  # CPU: 1, 2, 4 gloo ranks (~10 min on 2 cores)
    bash experiments/table12/run.sh --device cuda --model llama3-8b --ranks 1 2 4 8     # one node of GPUs, NCCL
    sbatch slurm/ulysses_scale.sh                                    # the same sweep under SLURM (see slurm/)

Paper: Table 12's numbers are not reported (docs/paper.md: "All numbers are NOT FOUND"); the text claims the sequence
length scales linearly with the number of GPUs. This script measures that claim: for each rank count it launches
``python -m experiments.table12.search`` under torchrun (one SP group over all ranks; each point is a real search,
every trial one training step measured per rank with ``measure_peak``), computes the scaling efficiency
S_max(N) / (N * S_max(1)), and puts the planner's prediction (``mst.memory.max_seq_len(..., sp_size=N)``) beside it:
for the same scaled model and budget (the prediction that seeds each search), and for Llama3-8B / Llama2-7B on
1-8 x 80 GB. Outputs: results/table12_<device>.{json,md} and the figure
paper_figures/table12_ulysses_scaling[_cuda].png (``--figures DIR`` draws it elsewhere); the per-rank-count search logs
go to results/points/. With --reuse, points already there are not recomputed (the SLURM script writes them with
srun, then calls this with --reuse to assemble the table).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ..cli import add_figures_arg, positive_float, positive_int, require_device
from ..results import ROOT, environment, figure_path, write_results
from .plot import figure, markdown
from .search import build_config, default_budget_mib, planner_limit

HERE = Path(__file__).resolve().parent
MiB = 1024 ** 2
TARGET_EFFICIENCY = 0.9  # issue 8: MsT + Ulysses max length >= 0.9 x ranks x single-rank max length
PLANNER_MODELS, PLANNER_GPUS, PLANNER_GB = ("llama3-8b", "llama2-7b"), (1, 2, 4, 8), 80.0


def point_path(args, ranks: int) -> Path:
    return Path(args.out_dir) / "points" / f"{args.device}-{args.model}-{args.budget_mib:g}MiB-x{ranks}.json"


def run_point(args, ranks: int) -> dict:
    """One rank count: ``experiments.table12.search`` under torchrun, from the repository root (or reuse its
    JSON)."""
    path = point_path(args, ranks)
    if not (args.reuse and path.exists()):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               "-m", "experiments.table12.search", "--device", args.device, "--model", args.model, "--budget-mib",
               str(args.budget_mib), "--grain", str(args.grain), "--out", str(path), "--strategies", *args.strategies]
        print(f"[table12] {ranks} rank(s): {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", "1")})
    return json.loads(path.read_text())


def planner_rows(args, config, ranks: list[int]) -> dict:
    """Planner's max length for the measured (scaled) model at the same per-rank budget, by strategy and ranks
    (the same prediction that seeds each point's search)."""
    return {strategy: {n: planner_limit(config, strategy, ranks=n, budget_mib=args.budget_mib, grain=args.grain,
                                        device=args.device) for n in ranks}
            for strategy in args.strategies}


def full_size_planner(args) -> dict:
    """Planner's max length for the paper's Table 12 models on 1-8 x 80 GB GPUs (bf16, AdamW, batch 1)."""
    from mst.configs import load_config
    from mst.memory import max_seq_len
    from mst.memory.planner import DEFAULT_RESERVE_GB

    def cell(model: str, strategy: str, gpus: int) -> int | None:
        try:
            return max_seq_len(load_config(model), strategy, sp_size=gpus, gpu_mem_gb=PLANNER_GB, optimizer="adamw")
        except ValueError as err:
            print(f"[table12] planner: {model} {strategy} x{gpus}: {err}", flush=True)
            return None

    models = {m: {s: {str(g): cell(m, s, g) for g in PLANNER_GPUS} for s in args.strategies}
              for m in PLANNER_MODELS}
    return {"gpu_mem_gb": PLANNER_GB, "reserve_gb": DEFAULT_RESERVE_GB, "optimizer": "adamw", "dtype": "bfloat16",
            "models": models}


def assemble(args, points: dict[int, dict]) -> dict:
    """The table from the points: rows with efficiency and the planner's column, the full-size planner rows."""
    config = build_config(args.model)
    try:
        planned = planner_rows(args, config, sorted(points))
    except ImportError as err:
        print(f"[table12] planner unavailable: {err}", flush=True)
        planned = {}
    rows = []
    for strategy in args.strategies:
        base = points.get(1, {}).get("strategies", {}).get(strategy, {}).get("max_seq_len")
        for n, point in sorted(points.items()):
            cell = point["strategies"][strategy]
            rows.append({"strategy": strategy, "ranks": n, "max_seq_len": cell["max_seq_len"],
                         "efficiency": cell["max_seq_len"] / (n * base) if base else None,
                         "step_seconds_at_max": cell["step_seconds_at_max"],
                         "probes": len(cell["probes"]), "planner": planned.get(strategy, {}).get(n)})
    first = next(iter(points.values()))
    mst_eff = [r["efficiency"] for r in rows if r["strategy"] == "mst" and r["ranks"] > 1 and r["efficiency"]]
    label = (f"{'Llama-3-8B scaled' if args.model == 'scaled' else args.model} (d={config.hidden_size}, "
             f"L={config.num_hidden_layers}, V={config.vocab_size}, I={config.intermediate_size}, "
             f"{config.num_attention_heads} heads / {config.num_key_value_heads} kv)")
    where = first.get("environment")  # points written before the environment header: "accelerator", "torch"
    measured = {"device": first["device"], "backend": first["backend"],
                "accelerator": where["device"] if where else first["accelerator"],
                "model": args.model, "model_label": label, "budget_mib": args.budget_mib, "grain": args.grain,
                "torch": where["versions"]["torch"] if where else first["torch"], "rows": rows,
                "mst_min_efficiency": min(mst_eff) if mst_eff else None,
                "target_efficiency": TARGET_EFFICIENCY,
                "target_met": bool(mst_eff) and min(mst_eff) >= TARGET_EFFICIENCY}
    results = {"environment": environment(args.device), "table": 12,
               "paper": "not reported (claims linear scaling with GPUs)", "measured": measured}
    try:
        results["planner"] = full_size_planner(args)
    except ImportError as err:
        print(f"[table12] full-size planner unavailable: {err}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--ranks", type=positive_int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--model", default="scaled", help="'scaled' (CPU default) or an mst.configs name")
    parser.add_argument("--strategies", nargs="+", default=["vanilla", "mst"], choices=["vanilla", "mst"])
    parser.add_argument("--budget-mib", type=positive_float, default=None,
                        help="per-rank budget (default: 32 MiB on CPU, 95%% of the GPU on CUDA)")
    parser.add_argument("--grain", type=positive_int, default=8, help="search grid, tokens per rank")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    parser.add_argument("--reuse", action="store_true", help="reuse point JSONs already in out-dir/points")
    add_figures_arg(parser)
    args = parser.parse_args(argv)
    require_device(args.device)
    if args.budget_mib is None:
        args.budget_mib = default_budget_mib(args.device)
    if 1 not in args.ranks:
        sys.exit("error: --ranks must include 1 (the efficiency is relative to one rank)")

    points = {n: run_point(args, n) for n in sorted(set(args.ranks))}
    results = assemble(args, points)
    out = Path(args.out_dir) / f"table12_{args.device}"
    write_results(out, results, markdown(results))  # each file replaced atomically
    png = figure(results, figure_path("table12_ulysses_scaling", args.device, args.figures))
    print(markdown(results))
    m = results["measured"]
    print(f"[table12] MsT+Ulysses min efficiency {m['mst_min_efficiency']} (target >= {TARGET_EFFICIENCY}: "
          f"{'met' if m['target_met'] else 'NOT met'}); wrote {out}.json/.md and {png}", flush=True)


if __name__ == "__main__":
    main()
