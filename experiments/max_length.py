"""Maximum sequence length per strategy: the driver behind experiments/table2, table3, table4 and table5.

    python -m experiments.max_length --table table2 --models llama3-8b llama2-7b            # CPU, scaled models
    python -m experiments.max_length --table table2 --models llama3-8b --device cuda        # full size on a GPU
    python -m experiments.max_length --table table5 --models llama3-8b --strategies ac+nf4 mst+nf4   # quantized

A strategy is a name from ``mst.memory.strategies.STRATEGIES``, optionally with ``+int8`` / ``+nf4``: frozen
k-bit weights with LoRA adapters trained (``mst.memory.quantization``, Table 5).

CPU mode (default) runs a real length search (``experiments.search.search_length``) on a scaled-down model with the
same shape ratios (``experiments.models.model_config``) under a memory budget that emulates the GPU at that scale
(``experiments.budget``: budget_s = static_s + free_full x k x t x dtype_factor, t = length scale, default k), so
the ratios vanilla : AC : MsT are measured, not assumed. Beside each measurement stands the planner's limit for the
same scaled setting, and the planner's full-size limit (the one full-size estimate). CUDA mode searches the
full-size models against the real GPU memory (running out of memory = does not fit).

Running out of memory anywhere in a cell -- building the model, the static probe, a trial -- is a failed trial with
its error text (a cell whose model does not even fit is recorded as 0 tokens); any other error is a bug and stops
the run. The JSON and markdown are rewritten atomically after every trial (``"complete": false`` and the unfinished
cell's trials under ``"in_progress"`` until the end), so a failure or a kill loses nothing that finished.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from mst.configs import SCALED_HEAD_DIM, load_config
from mst.memory.length_search import Trial
from mst.memory.planner import DEFAULT_RESERVE_GB
from mst.memory.planner import max_seq_len as planned_max_seq_len
from mst.memory.quantization import QUANTIZATIONS
from mst.memory.strategies import STRATEGIES, make_train_step, prepare

from .budget import GiB, emulated_free_bytes, planner_kwargs, split_strategy
from .cli import add_figures_arg, positive_float, positive_int, require_device
from .models import build_model, model_config
from .results import environment, figure_path, write_results
from .search import search_length

# Paper values (docs/paper.md §1): exact where printed, "inferred" where derived from printed ratios, None = not reported
PAPER = {
    "table2": {"llama3-8b": {"vanilla": ("5K", "inferred 60K/12"), "ac": ("15K", "inferred 60K/4"), "mst": ("60K", "exact")},
               "llama2-7b": {"vanilla": ("7K", "inferred 84K/12"), "ac": ("47K", "inferred 84K/1.8"), "mst": ("84K", "exact")}},
    "table3": {"mistral-7b": {"mst/vanilla": ("12x", "exact")}, "qwen2-7b": {"mst/vanilla": ("18x", "exact")},
               "gemma2-9b": {"mst/vanilla": ("24x", "exact"), "mst/ac": ("8x", "exact")}},
    "table4": {"llama3-8b": {"vanilla": ("1.4K", "inferred 30K/21"), "ac": ("8K", "exact"), "mst": ("30K", "exact")},
               "llama2-7b": {"mst": ("55K", "exact")}},
    # "8-bit / 4-bit (standard)" read as HF's QLoRA recipe, which turns checkpointing on: our ac+int8 / ac+nf4
    "table5": {"llama3-8b": {"ac+int8": ("5K", "inferred 110K/22"), "ac+nf4": ("28K", "exact"), "mst": ("60K", "exact"),
                             "mst+int8": ("110K", "exact"), "mst+nf4": ("140K", "exact")}},
}
# ratios printed per table (numerator, denominator)
RATIOS = {"table5": [("mst+int8", "ac+int8"), ("mst+nf4", "ac+nf4"), ("mst+nf4", "mst")]}
DEFAULT_RATIOS = [("mst", "vanilla"), ("mst", "ac")]


def planner_settings(args) -> dict:
    """The planner's settings of this run (full size unless overridden)."""
    return dict(gpu_mem_gb=args.gpu_mem_gb, optimizer=args.optimizer, accumulation_steps=args.accumulation_steps)


def search_cell(config, name: str, args, device: torch.device, on_trial: Callable[[Trial], None], *,
                free_bytes: int | None = None, expect: int | None = None) -> dict:
    """One model x strategy search (``experiments.search.search_length``); on CPU the planner's limit for exactly
    the measured setting (scaled model, CPU dtype, the same budget) seeds it, which also validates the planner."""
    strategy, quantization = split_strategy(name)

    def seed_for_budget(budget: int) -> int:
        planned, kwargs = planner_kwargs(name, **{**planner_settings(args), "gpu_mem_gb": budget / GiB},
                                         dtype=args.dtype)
        return planned_max_seq_len(config, planned, reserve_gb=0.0, device="cpu", granularity=16, **kwargs)

    return search_length(
        lambda: prepare(build_model(config, device=device, dtype=args.dtype, weights=args.weights), strategy,
                        quantization=quantization),
        lambda model: make_train_step(model, optimizer=args.optimizer, accumulation_steps=args.accumulation_steps),
        device=device, free_bytes=free_bytes, seed_for_budget=seed_for_budget, expect=expect, on_trial=on_trial)


def run(args, save: Callable[[dict], None] = lambda result: None) -> dict:
    """Every model x strategy search; ``save(result)`` when a cell starts, after each of its trials and when it
    ends (the result so far, see the module doc), and at the end."""
    require_device(args.device)
    device = torch.device(args.device)
    configs = {name: load_config(name) for name in args.models}  # an unknown name fails before any search
    result = {
        "table": args.table, "environment": environment(device), "dtype": str(args.dtype).replace("torch.", ""),
        "optimizer": args.optimizer, "accumulation_steps": args.accumulation_steps, "gpu_mem_gb": args.gpu_mem_gb,
        "paper": PAPER.get(args.table, {}), "complete": False, "models": [],
    }
    with tqdm(total=len(args.models) * len(args.strategies), desc=args.table, unit="search") as bar:
        for name, full in configs.items():
            row = {"model": name, "strategies": {}}
            result["models"].append(row)
            if device.type == "cpu":
                small = model_config(name, device, args.hidden, args.layers)
                k = small.hidden_size / full.hidden_size
                t = k if args.length_scale is None else args.length_scale
                row.update(hidden_small=small.hidden_size, layers_small=small.num_hidden_layers, k=k, length_scale=t)
            for strategy in args.strategies:
                planned_strategy, kwargs = planner_kwargs(strategy, **planner_settings(args))
                predicted = planned_max_seq_len(full, planned_strategy, **kwargs)
                cell = {"planner_full": predicted}
                result["in_progress"] = {"model": name, "strategy": strategy, "trials": []}
                save(result)  # on disk: which cell a failure or kill stopped in

                def on_trial(trial: Trial, strategy: str = strategy) -> None:
                    bar.set_postfix_str(f"{name} {strategy} S={trial.seq_len} {'fits' if trial.fits else 'no'}")
                    result["in_progress"]["trials"].append(asdict(trial))
                    save(result)

                if device.type == "cpu":
                    free = emulated_free_bytes(full, strategy, scale=k * t, dtype=args.dtype, **planner_settings(args))
                    found = search_cell(small, strategy, args, device, on_trial, free_bytes=free)
                    cell.update(measured_small=found["max_seq_len"], budget_bytes=found["budget_bytes"],
                                planner_small=found["seed"], search=found)
                else:
                    found = search_cell(full, strategy, args, device, on_trial, expect=predicted)
                    cell.update(measured_full=found["max_seq_len"], search=found)
                row["strategies"][strategy] = cell
                del result["in_progress"]
                save(result)
                bar.update(1)
    result["complete"] = True
    save(result)
    return result


def _k(n: int | None) -> str:
    """Tokens in K; "—" only when there is no number (0 = measured: not even the shortest length fits)."""
    return "—" if n is None else f"{n / 1000:.1f}K"


def markdown(result: dict) -> str:
    """The README tables of ``result``; one of an unfinished run says so and lists the finished cells only."""
    cells = [(row["model"], s, c) for row in result["models"] for s, c in row["strategies"].items()]
    cpu = result["environment"]["device_type"] == "cpu"
    lines = [f"# {result['table']}: maximum sequence length ({result['environment']['device']}, {result['dtype']}, "
             f"{result['optimizer']}, accumulation steps {result['accumulation_steps']})", ""]
    if not result.get("complete", True):
        lines += [f"**incomplete**: {len(cells)} searches finished so far (the run stopped, or is still running)", ""]
    head = f"| model | strategy | paper (A100 80GB) | planner, full size, {result['gpu_mem_gb']:g} GB |"
    head += " measured, scaled model (CPU) | planner, same scaled setting |" if cpu else " measured (GPU) |"
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for row in result["models"]:
        paper = result["paper"].get(row["model"], {})
        for strategy, cell in row["strategies"].items():
            pv = paper.get(strategy)
            pcol = f"{pv[0]} ({pv[1]})" if pv else "not reported"
            planned = cell.get("planner_small")
            meas = (f"{cell['measured_small']} tok | {'—' if planned is None else f'{planned} tok'}" if cpu
                    else _k(cell["measured_full"]))
            lines.append(f"| {row['model']} | {strategy} | {pcol} | {_k(cell['planner_full'])} | {meas} |")
    failed = [(m, s, c["search"]["static_probe"]["error"]) for m, s, c in cells
              if ((c.get("search") or {}).get("static_probe") or {}).get("fits") is False]
    if failed:
        lines += ["", "Did not fit even at 16 tokens (static probe): "
                  + "; ".join(f"{m} {s}: {error}" for m, s, error in failed)]
    measured = "measured (scaled, CPU)" if cpu else "measured (GPU)"
    lines += ["", f"| model | ratio | paper | planner, full size | {measured} |", "|---|---|---|---|---|"]
    for row in result["models"]:
        s = row["strategies"]
        key = "measured_small" if cpu else "measured_full"
        for a, b in RATIOS.get(result["table"], DEFAULT_RATIOS):
            if a in s and b in s:
                pv = result["paper"].get(row["model"], {})
                paper_ratio = pv.get(f"{a}/{b}", (None,))[0] or _paper_ratio(pv, a, b)
                lines.append(f"| {row['model']} | {a}/{b} | {paper_ratio or 'not reported'} | "
                             f"{_ratio(s[a]['planner_full'], s[b]['planner_full'])} | "
                             f"{_ratio(s[a][key], s[b][key])} |")
    return "\n".join(lines) + "\n"


def _ratio(x: int | None, y: int | None) -> str:
    return f"{x / y:.1f}x" if x and y else "—"


def _paper_ratio(paper: dict, a: str, b: str) -> str | None:
    if a in paper and b in paper:
        x, y = (float(paper[s][0].rstrip("K")) for s in (a, b))
        return f"{x / y:.1f}x"
    return None


def plot(result: dict, path: str | Path) -> None:
    """Figure 1c: per model, the full-size lengths (paper vs the planner) and, on CPU, the scaled model's measured
    lengths beside the planner for that same scaled setting (two scales, never mixed on one axis)."""
    import matplotlib.pyplot as plt

    from .results import save_figure

    rows, cpu = result["models"], result["environment"]["device_type"] == "cpu"
    panels = [("full size (K tokens)", lambda row, s, paper: {
        "paper (A100; vanilla/AC inferred)": _paper_tokens(paper.get(s)),
        f"planner ({result['gpu_mem_gb']:g} GB)": row["strategies"][s]["planner_full"],
        **({} if cpu else {"measured (GPU)": row["strategies"][s]["measured_full"]})})]
    if cpu:
        panels.append(("scaled model, CPU (K tokens)", lambda row, s, paper: {
            "measured": row["strategies"][s]["measured_small"],
            "planner, same setting": row["strategies"][s].get("planner_small")}))
    fig, axes = plt.subplots(len(panels), len(rows), figsize=(4.2 * len(rows), 3.3 * len(panels)), squeeze=False)
    for r, (ylabel, values_of) in enumerate(panels):
        for ax, row in zip(axes[r], rows):
            strategies = list(row["strategies"])
            paper = result["paper"].get(row["model"], {})
            values = [values_of(row, s, paper) for s in strategies]
            labels = list(values[0]) if values else []
            width = 0.8 / max(1, len(labels))
            for i, label in enumerate(labels):
                xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(strategies))]
                ax.bar(xs, [(v[label] or 0) / 1000 for v in values], width, label=label)
            ax.set_xticks(range(len(strategies)), strategies)
            ax.set_title(row["model"], fontsize=9)
            ax.set_ylabel(ylabel)
        axes[r][0].legend(fontsize=7)
    save_figure(fig, path, title=f"{result['table']}: max trainable length, {result['environment']['device']}")


def _paper_tokens(value) -> float | None:
    return float(value[0].rstrip("K")) * 1000 if value and value[0].endswith("K") else None


FIGURES = {"table2": "fig1c_max_length"}  # the paper's figure a table's results draw; others: <table>_max_length


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default="table2")
    p.add_argument("--models", nargs="+", default=["llama3-8b", "llama2-7b"])
    p.add_argument("--strategies", nargs="+", default=["vanilla", "ac", "mst"],
                   help=f"from {', '.join(STRATEGIES)}, each optionally +{' / +'.join(QUANTIZATIONS)} (Table 5)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="dtype of the measured model (default: float32 on CPU, where bf16 is ~6x slower; bfloat16 on CUDA)")
    p.add_argument("--optimizer", default="adamw_in_backward", choices=["adamw", "adamw_in_backward"])
    p.add_argument("--accumulation-steps", type=positive_int, default=1, help="gradient accumulation (Table 4)")
    p.add_argument("--gpu-mem-gb", type=positive_float, default=80.0,
                   help=f"GPU memory in GiB (more than the {DEFAULT_RESERVE_GB} GiB reserve)")
    p.add_argument("--hidden", type=positive_int, default=128,
                   help=f"hidden size of the scaled CPU model (a multiple of {SCALED_HEAD_DIM})")
    p.add_argument("--layers", type=positive_int, default=None,
                   help="override the layer count of the scaled model (smoke runs only: ratios depend on L)")
    p.add_argument("--length-scale", type=positive_float, default=None,
                   help="t in the budget rule (default k = d_s/d)")
    p.add_argument("--weights", default=None, help="local HF checkpoint (cuda mode); default random weights")
    p.add_argument("--out", default=None, help="results folder (default experiments/<table>/results)")
    add_figures_arg(p)
    args = p.parse_args(argv)
    if args.hidden % SCALED_HEAD_DIM:
        p.error(f"argument --hidden: must be a multiple of {SCALED_HEAD_DIM} (the scaled head_dim), got {args.hidden}")
    if args.gpu_mem_gb <= DEFAULT_RESERVE_GB:
        p.error(f"argument --gpu-mem-gb: must exceed the {DEFAULT_RESERVE_GB} GiB reserve, got {args.gpu_mem_gb}")
    args.dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    for name in args.strategies:
        try:
            split_strategy(name)
        except ValueError as exc:
            p.error(str(exc))
    stem = Path(args.out or Path(__file__).parent / args.table / "results") / f"max_length_{args.device}"
    saved = []

    def save(partial: dict) -> None:
        write_results(stem, partial, markdown(partial))
        saved.append(True)

    try:
        result = run(args, save)
    except ValueError as exc:  # unknown model, impossible budget, ...: say it plainly
        sys.exit(f"error: {exc}" + (f" (what finished is in {stem}.json)" if saved else ""))
    plot(result, figure_path(FIGURES.get(args.table, f"{args.table}_max_length"), args.device, args.figures))
    print(markdown(result))


if __name__ == "__main__":
    main()
