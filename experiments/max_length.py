"""Maximum sequence length per strategy: the driver behind experiments/table2, table3, table4 and table5.

    python experiments/max_length.py --table table2 --models llama3-8b llama2-7b            # CPU, scaled models
    python experiments/max_length.py --table table2 --models llama3-8b --device cuda        # full size on a GPU
    python experiments/max_length.py --table table5 --models llama3-8b --strategies ac+nf4 mst+nf4   # quantized

A strategy is a name from ``mst.memory.strategies.STRATEGIES``, optionally with ``+int8`` / ``+nf4``: frozen
k-bit weights with LoRA adapters trained (``mst.memory.quantization``, Table 5).

CPU mode (default) runs a real length search (mst.memory.length_search) on a scaled-down model with the same
shape ratios (mst.configs.scaled_config: same layer count, V/d, I/d and GQA, hidden d_s instead of d), under a
memory budget that emulates the GPU at that scale:

    budget_s = static_s + (gpu_bytes - static_full) * k * t,   k = d_s / d,  t = length scale (default k)

static = weights + gradients + optimizer state (measured for the small model at a short length; planned for the
full one). Every per-token cost (activations, checkpoints, MLP/LM-head intermediates) scales with d, i.e. by k, so
a strategy whose full-size limit is S fits t*S tokens at small scale: the ratios vanilla : AC : MsT are measured,
not assumed, and ``measured / t`` is comparable to the full-size number. The planner's full-size predictions are
printed beside them. CUDA mode searches the full-size models against the real GPU memory (OOM = does not fit).

Running out of memory anywhere in a cell -- building the model, the static probe, a trial -- is a failed trial with
its error text (a cell whose model does not even fit is recorded as 0 tokens); any other error is a bug and stops
the run. The JSON and markdown are rewritten atomically after every trial (``"complete": false`` and the unfinished
cell's trials under ``"in_progress"`` until the end), so a failure or a kill loses nothing that finished.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import mst
from mst.configs import SCALED_HEAD_DIM, load_config, scaled_config
from mst.memory.planner import DEFAULT_RESERVE_GB, plan
from mst.memory.planner.traced import flash_equivalent
from mst.memory.planner import max_seq_len as planned_max_seq_len
from mst.memory.length_search import SearchResult, Trial, run_trial, search_max_seq_len
from mst.memory.measure import free_memory
from mst.memory.quantization import QUANTIZATIONS
from mst.memory.strategies import STRATEGIES, make_train_step, prepare

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import atomic_output, positive_float, positive_int, write_results  # noqa: E402

GiB = 1024 ** 3  # the planner reads gpu_mem_gb as GiB and keeps DEFAULT_RESERVE_GB for CUDA context etc.

# Paper values (paper.md §1): exact where printed, "inferred" where derived from printed ratios, None = not reported
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


def split_strategy(name: str) -> tuple[str, str | None]:
    """"mst+nf4" -> ("mst", "nf4"); "ac" -> ("ac", None). Raises ValueError for unknown parts."""
    strategy, _, quantization = name.partition("+")
    if strategy not in STRATEGIES or (quantization and quantization not in QUANTIZATIONS):
        raise ValueError(f"unknown strategy {name!r}: use one of {', '.join(STRATEGIES)}, optionally "
                         f"+{' / +'.join(QUANTIZATIONS)}")
    return strategy, quantization or None


def build_model(config, device: torch.device, dtype: torch.dtype, weights: str | None):
    from transformers import AutoModelForCausalLM

    if weights:
        return AutoModelForCausalLM.from_pretrained(weights, dtype=dtype, local_files_only=True).to(device)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def search_one(config, name: str, args, free_bytes: int | None, device: torch.device,
               on_trial: Callable[[Trial], None], expect: int | None = None) -> dict:
    """Search one strategy. ``free_bytes`` (CPU emulation) is added to this model's own static bytes -- weights,
    gradients and optimizer state, i.e. the peak of a 16-token step, the ``static_probe`` -- to form the budget, and
    the planner's limit for exactly that budget seeds the search; ``free_bytes=None``: the real device, the search
    seeded by ``expect``. The model is built inside the first trial, so running out of memory while building it is a
    failed trial; a failed static probe ends the search at 0 tokens. ``on_trial`` sees every trial (probe too)."""
    strategy, quantization = split_strategy(name)
    built: list = []  # [(step, track)] once the first trial has built the model

    def make_step(seq_len: int):
        if not built:
            model = prepare(build_model(config, device, args.dtype, args.weights), strategy, quantization=quantization)
            built.append(make_train_step(model, optimizer=args.optimizer, grad_accumulation=args.grad_accumulation))
        step, track = built[0]
        return (lambda: step(seq_len)), track

    budget, granularity, probe = None, 1024, None
    try:
        if free_bytes is not None:
            probe, _ = run_trial(make_step, 16, None, device, method="rss")
            on_trial(probe)
            if not probe.fits:  # not even the model, its optimizer and a 16-token step
                return {**SearchResult(0, None, str(device)).to_dict(), "seed": None, "static_probe": asdict(probe)}
            budget = int(probe.peak_bytes) + free_bytes
            expect = planner_small(config, name, budget, args)
            granularity = max(16, expect // 32 // 16 * 16)
        result = search_max_seq_len(make_step, budget_bytes=budget, device=device, expect=expect,
                                    granularity=granularity, progress=on_trial, warmup_steps=1,
                                    method="rss" if device.type == "cpu" else "tracker")
    finally:
        built.clear()
        free_memory()
    return {**result.to_dict(), "seed": expect, "static_probe": asdict(probe) if probe else None}


def planner_kwargs(name: str, args, **overrides) -> tuple[str, dict]:
    """The planner's strategy and keyword arguments for strategy ``name`` under ``args`` (full size by default)."""
    strategy, quantization = split_strategy(name)
    kwargs = dict(gpu_mem_gb=args.gpu_mem_gb, optimizer=args.optimizer, dtype=args.full_dtype,
                  grad_accumulation=args.grad_accumulation > 1, quantization=quantization)
    return strategy, {**kwargs, **overrides}


def static_bytes_full(config, name: str, args) -> float:
    """Weights + gradients + optimizer state of the full-size model, from the planner."""
    strategy, kwargs = planner_kwargs(name, args)
    p = plan(config, 1, strategy, **kwargs)
    return sum(p.breakdown.get(key, 0) for key in ("weights", "gradients", "optimizer_state"))


def planner_small(config, name: str, budget: int, args) -> int:
    """The planner's limit for exactly the measured setting (scaled model, CPU dtype, same budget): validates it."""
    strategy, kwargs = planner_kwargs(name, args, gpu_mem_gb=budget / GiB, dtype=args.dtype)
    return planned_max_seq_len(config, strategy, reserve_gb=0.0, device="cpu", granularity=16, **kwargs)


def run(args, save: Callable[[dict], None] = lambda result: None) -> dict:
    """Every model x strategy search; ``save(result)`` when a cell starts, after each of its trials and when it
    ends (the result so far, see the module doc), and at the end."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")
    configs = {name: load_config(name) for name in args.models}  # an unknown name fails before any search
    result = {
        "table": args.table, "device": _device_name(device), "dtype": str(args.dtype).replace("torch.", ""),
        "optimizer": args.optimizer, "grad_accumulation": args.grad_accumulation, "gpu_mem_gb": args.gpu_mem_gb,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "mst": mst.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M"), "paper": PAPER.get(args.table, {}), "complete": False, "models": [],
    }
    with tqdm(total=len(args.models) * len(args.strategies), desc=args.table, unit="search") as bar:
        for name, full in configs.items():
            row = {"model": name, "strategies": {}}
            result["models"].append(row)
            if device.type == "cpu":
                small = scaled_config(name, hidden_size=args.hidden,
                                      **({} if args.layers is None else {"num_hidden_layers": args.layers}))
                if getattr(full, "attn_logit_softcapping", None):
                    # HF has no SDPA path for Gemma-2's attention softcap: eager attention, or SDPA with its S x S
                    # masks, materialises S x S tensors on CPU, while flash-attn on a GPU applies the cap and the
                    # windows inside the kernel. Memory, not values, is measured, so the CPU emulation uses the
                    # planner's flash-equivalent attention.
                    small = flash_equivalent(small)
                k = small.hidden_size / full.hidden_size
                t = k if args.length_scale is None else args.length_scale
                # per-token tensors of an fp32 CPU model are twice a bf16 model's (the fp32 logits upcast of HF's
                # loss is the exception, which makes this rule slightly favour vanilla/AC: MsT ratios are conservative)
                dtype_factor = torch.finfo(args.dtype).bits / torch.finfo(args.full_dtype).bits
                row.update(hidden_small=small.hidden_size, layers_small=small.num_hidden_layers, k=k, length_scale=t,
                           dtype_factor=dtype_factor)
            for strategy in args.strategies:
                planned_strategy, kwargs = planner_kwargs(strategy, args)
                predicted = planned_max_seq_len(full, planned_strategy, **kwargs)
                cell = {"planner_full": predicted}
                result["in_progress"] = {"model": name, "strategy": strategy, "trials": []}
                save(result)  # on disk: which cell a failure or kill stopped in

                def on_trial(trial: Trial, strategy: str = strategy) -> None:
                    bar.set_postfix_str(f"{name} {strategy} S={trial.seq_len} {'fits' if trial.fits else 'no'}")
                    result["in_progress"]["trials"].append(asdict(trial))
                    save(result)

                if device.type == "cpu":
                    free_full = (args.gpu_mem_gb - DEFAULT_RESERVE_GB) * GiB - static_bytes_full(full, strategy, args)
                    found = search_one(small, strategy, args, int(free_full * k * t * dtype_factor), device, on_trial)
                    cell.update(measured_small=found["max_seq_len"], measured_full_equiv=round(found["max_seq_len"] / t),
                                budget_bytes=found["budget_bytes"], planner_small=found["seed"], search=found)
                else:
                    found = search_one(full, strategy, args, None, device, on_trial, expect=predicted)
                    cell.update(measured_full=found["max_seq_len"], search=found)
                row["strategies"][strategy] = cell
                del result["in_progress"]
                save(result)
                bar.update(1)
    result["complete"] = True
    save(result)
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _k(n: int | None) -> str:
    """Tokens in K; "—" only when there is no number (0 = measured: not even the shortest length fits)."""
    return "—" if n is None else f"{n / 1000:.1f}K"


def markdown(result: dict) -> str:
    """The README tables of ``result``; one of an unfinished run says so and lists the finished cells only."""
    cells = [(row["model"], s, c) for row in result["models"] for s, c in row["strategies"].items()]
    cpu = any("measured_small" in c for _, _, c in cells)
    lines = [f"# {result['table']}: maximum sequence length ({result['device']}, {result['dtype']}, "
             f"{result['optimizer']}, grad accumulation {result['grad_accumulation']})", ""]
    if not result.get("complete", True):
        lines += [f"**incomplete**: {len(cells)} searches finished so far (the run stopped, or is still running)", ""]
    head = "| model | strategy | paper (A100 80GB) | planner, full size, 80 GB |"
    head += (" measured, scaled model (CPU) | planner, same scaled setting | measured ÷ t (full-size equivalent) |"
             if cpu else " measured (GPU) |")
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for row in result["models"]:
        paper = result["paper"].get(row["model"], {})
        for strategy, cell in row["strategies"].items():
            pv = paper.get(strategy)
            pcol = f"{pv[0]} ({pv[1]})" if pv else "not reported"
            planned = cell.get("planner_small")
            meas = (f"{cell['measured_small']} tok | {'—' if planned is None else f'{planned} tok'} | "
                    f"{_k(cell['measured_full_equiv'])}" if cpu
                    else _k(cell["measured_full"]))
            lines.append(f"| {row['model']} | {strategy} | {pcol} | {_k(cell['planner_full'])} | {meas} |")
    failed = [(m, s, c["search"]["static_probe"]["error"]) for m, s, c in cells
              if ((c.get("search") or {}).get("static_probe") or {}).get("fits") is False]
    if failed:
        lines += ["", "Did not fit even at 16 tokens (static probe): "
                  + "; ".join(f"{m} {s}: {error}" for m, s, error in failed)]
    lines += ["", "| model | ratio | paper | planner | measured |", "|---|---|---|---|---|"]
    for row in result["models"]:
        s = row["strategies"]
        key = "measured_small" if cpu else "measured_full"
        for a, b in RATIOS.get(result["table"], DEFAULT_RATIOS):
            if a in s and b in s:
                pv = result["paper"].get(row["model"], {})
                paper_ratio = pv.get(f"{a}/{b}", (None,))[0] or _paper_ratio(pv, a, b)
                ratio = lambda x, y: f"{x / y:.1f}x" if x and y else "—"  # noqa: E731
                lines.append(f"| {row['model']} | {a}/{b} | {paper_ratio or 'not reported'} | "
                             f"{ratio(s[a]['planner_full'], s[b]['planner_full'])} | "
                             f"{ratio(s[a][key], s[b][key])} |")
    return "\n".join(lines) + "\n"


def _paper_ratio(paper: dict, a: str, b: str) -> str | None:
    if a in paper and b in paper:
        x, y = (float(paper[s][0].rstrip("K")) for s in (a, b))
        return f"{x / y:.1f}x"
    return None


def plot(result: dict, path: str | Path) -> None:
    """Figure 1c: bars per model and strategy, paper vs planner vs our measurement (full-size equivalent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["models"]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.6), squeeze=False)
    for ax, row in zip(axes[0], rows):
        strategies = list(row["strategies"])
        paper = result["paper"].get(row["model"], {})
        series = {
            "paper (A100; vanilla/AC inferred)": [_paper_tokens(paper.get(s)) for s in strategies],
            "planner (80 GB)": [row["strategies"][s]["planner_full"] for s in strategies],
            f"measured ({'CPU scaled ÷ t' if 'measured_small' in row['strategies'][strategies[0]] else 'GPU'})":
                [row["strategies"][s].get("measured_full_equiv", row["strategies"][s].get("measured_full"))
                 for s in strategies],
        }
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(strategies))]
            ax.bar(xs, [(v or 0) / 1000 for v in values], width, label=label)
        ax.set_xticks(range(len(strategies)), strategies)
        ax.set_title(row["model"])
        ax.set_ylabel("max sequence length (K tokens)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{result['table']}: max trainable length, {result['device']}", fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _paper_tokens(value) -> float | None:
    return float(value[0].rstrip("K")) * 1000 if value and value[0].endswith("K") else None


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
    p.add_argument("--grad-accumulation", type=positive_int, default=1)
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
    args = p.parse_args(argv)
    if args.hidden % SCALED_HEAD_DIM:
        p.error(f"argument --hidden: must be a multiple of {SCALED_HEAD_DIM} (the scaled head_dim), got {args.hidden}")
    if args.gpu_mem_gb <= DEFAULT_RESERVE_GB:
        p.error(f"argument --gpu-mem-gb: must exceed the {DEFAULT_RESERVE_GB} GiB reserve, got {args.gpu_mem_gb}")
    args.full_dtype = torch.bfloat16  # the paper's training dtype, used by the planner
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
    plot(result, stem.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
