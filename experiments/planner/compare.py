"""Planner vs measurement, and the planner's Llama3-8B / Llama2-7B limits on one 80 GB GPU (paper Table 2).

    bash experiments/planner/run.sh                    # CPU: fp32 tiny models, MemTracker (16 min, 2 shared cores)
    bash experiments/planner/run.sh --quick            # one size, two lengths (notebook / smoke test)
    bash experiments/planner/run.sh --device cuda      # same grid in bf16 on a GPU (allocator peak measured too)
    bash experiments/planner/run.sh --replot           # summary.md and PNGs again from the committed JSON

Part 1 (``compare``): three model sizes (Llama3-8B shape scaled to d = 64/128/256 by ``mst.configs.scaled_config``,
2 layers) x three sequence lengths x every strategy: one real training step (forward, backward, AdamW step, after a
warm-up step so AdamW state exists) measured with ``mst.memory.measure_peak``, next to ``mst.memory.plan`` with both
engines; error = (planned - measured) / measured. On CPU the host-offloaded checkpoints of mst_offload live in the
same memory as everything else, so they are added to the device peak before comparing.

Part 2 (``limits``): ``mst.memory.max_seq_len`` for the full Llama3-8B and Llama2-7B configs on 80 GiB (bf16, both
optimizers, both engines), beside the paper's Table 2 values, and the planner's breakdown at our aims (MsT without
offload >= 110K tokens; MsT + checkpoint offload + optimizer-in-backward >= 600K tokens) naming the blocking term,
and the same limits with the hidden-state norms in mini-sequences (``mst.apply(norms=True)``, traced engine) with
the bytes per token of the peak's variable terms before and after.
Writes results/compare.json, results/limits.json, results/summary.md and paper_figures/planner_errors.png,
paper_figures/planner_limits.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mst.configs import load_config, scaled_config
from mst.memory import max_seq_len, measure_peak, plan
from mst.memory.planner import DEFAULT_RESERVE_GB, ModelSpec, Workload
from mst.memory.planner.analytic import _Sizes
from mst.memory.strategies import STRATEGIES, make_train_step, prepare

from ..cli import add_figures_arg, positive_float, positive_int, require_device
from ..models import build_model
from ..results import environment, figure_path, save_figure, write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = ("analytic", "traced")
GiB = 1024 ** 3
# docs/paper.md §1 Table 2 (A100 80GB, bf16, optimizer-in-backward): exact where printed, inferred from printed ratios
PAPER = {"llama3-8b": {"vanilla": "~5K (inferred 60K/12)", "ac": "~15K (inferred 60K/4)", "mst": "60K (exact)",
                       "mst_offload": "not reported"},
         "llama2-7b": {"vanilla": "~7K (inferred 84K/12)", "ac": "~47K (inferred 84K/1.8)", "mst": "84K (exact)",
                       "mst_offload": "not reported"}}
AIMS = {"mst": ("adamw_in_backward", 110_000), "mst_offload": ("adamw_in_backward", 600_000)}
# the official code's MsT (docs/paper.md §5.2 item 5): its MLP "mini-sequences" are a plain loop under autograd, so the
# recomputed layer keeps every chunk's intermediates; mini-s chunks the LM head into M = 64 pieces
OFFICIAL = {"mlp_mode": "naive", "lm_head_chunks": 64}
NORMS = {"norms": True}  # mst.apply(norms=True): the hidden-state norms in mini-sequences too
VARIABLE = ("activations", "transient")  # the terms of a plan that grow with the sequence


def measure(config, seq_len: int, strategy: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Peak of one real training step (after a warm-up step), as ``measure_peak`` reports it."""
    model = prepare(build_model(config, device=device, dtype=dtype), strategy)
    train_step, track = make_train_step(model)
    step = lambda: train_step(seq_len)  # noqa: E731
    step()
    report = measure_peak(step, track, device)
    del model, step, track
    return {"peak_bytes": report.allocator_peak_bytes or report.peak_bytes, "tracker_peak_bytes": report.peak_bytes,
            "breakdown": report.breakdown}


def compare(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    sizes, lengths = ((64,), (1024, 2048)) if args.quick else ((64, 128, 256), (1024, 2048, 4096))
    grid = [(d, s, st) for d in sizes for s in lengths for st in STRATEGIES]
    rows = []
    for d, seq_len, strategy in tqdm(grid, desc="planner vs measured", unit="step"):
        config = scaled_config(args.model, d, num_hidden_layers=args.layers)
        row = {"model": f"{args.model} scaled d={d} L={args.layers}", "hidden_size": d, "seq_len": seq_len,
               "strategy": strategy, "device": str(device), "dtype": str(dtype).split(".")[-1],
               "measured": measure(config, seq_len, strategy, device, dtype)}
        for engine in ENGINES:
            # device="cpu": the planner counts mst_offload's host checkpoints as resident (same memory on a CPU)
            p = plan(config, seq_len, strategy, dtype=dtype, engine=engine, device=device.type)
            resident = p.peak_bytes
            row[engine] = {"peak_bytes": resident, "phase": p.phase, "breakdown": p.breakdown,
                           "error_pct": 100.0 * (resident - row["measured"]["peak_bytes"])
                           / row["measured"]["peak_bytes"]}
        rows.append(row)
    return rows


def blocking_terms(config, seq_len: int, strategy: str) -> dict:
    """The named tensors behind the top-layer backward of Llama-style MsT at ``seq_len`` (analytic sizes, GiB)."""
    spec = ModelSpec.from_config(config)
    z = _Sizes(spec, Workload(seq_len, strategy, optimizer="adamw_in_backward"))
    terms = {"checkpoints on the device (L x S x d bf16)": 0 if strategy == "mst_offload" else spec.layers * z.X,
             "RMSNorm backward: fp32 input + 5 fp32 temporaries (6 x S x d x 4 B)": z.norm_bwd,
             "attention saved for backward (q, k, v, out, lse)": z.att,
             "other hidden-size tensors in the recomputed layer (input, norm outputs, gradients)": 6 * z.X}
    return {k: round(v / GiB, 2) for k, v in terms.items()}


def limits(args) -> dict:
    out = {}
    jobs = [(m, st, opt, eng) for m in ("llama3-8b", "llama2-7b") for st in STRATEGIES
            for opt in ("adamw", "adamw_in_backward") for eng in ENGINES]
    for model, strategy, optimizer, engine in tqdm(jobs, desc="max_seq_len on 80 GB", unit="search"):
        config = load_config(model)
        start = time.perf_counter()
        length = max_seq_len(config, strategy, gpu_mem_gb=args.gpu_mem_gb, optimizer=optimizer, engine=engine)
        at = plan(config, max(length, 256), strategy, gpu_mem_gb=args.gpu_mem_gb, optimizer=optimizer, engine=engine)
        out.setdefault(model, {}).setdefault(strategy, {}).setdefault(optimizer, {})[engine] = {
            "max_seq_len": length, "peak_bytes": at.peak_bytes, "phase": at.phase, "breakdown": at.breakdown,
            "search_s": round(time.perf_counter() - start, 2)}
    for model in ("llama3-8b", "llama2-7b"):  # the paper's implementation, as a what-if (traced engine only)
        start = time.perf_counter()
        length = max_seq_len(load_config(model), "mst", gpu_mem_gb=args.gpu_mem_gb, optimizer="adamw_in_backward",
                             engine="traced", granularity=1024, mst_options=OFFICIAL)
        out[model]["mst"]["adamw_in_backward"]["traced_official_code"] = {
            "max_seq_len": length, "granularity": 1024, "search_s": round(time.perf_counter() - start, 2)}
    kwargs = dict(gpu_mem_gb=args.gpu_mem_gb, optimizer="adamw_in_backward", engine="traced", mst_options=NORMS)
    for model in ("llama3-8b", "llama2-7b"):  # norms in mini-sequences, beside the traced engine's plain MsT
        config = load_config(model)
        for strategy in ("mst", "mst_offload"):
            start = time.perf_counter()
            length = max_seq_len(config, strategy, **kwargs)
            at = plan(config, length, strategy, **kwargs)
            out[model][strategy]["adamw_in_backward"]["traced_norms"] = {
                "max_seq_len": length, "peak_bytes": at.peak_bytes, "phase": at.phase, "breakdown": at.breakdown,
                "search_s": round(time.perf_counter() - start, 2)}
    for strategy, (optimizer, target) in AIMS.items():  # what blocks our aims, per engine
        config = load_config("llama3-8b")
        for engine in ENGINES:
            at = plan(config, target, strategy, gpu_mem_gb=args.gpu_mem_gb, optimizer=optimizer, engine=engine)
            term = max((k for k in at.breakdown if k not in ("weights", "optimizer_state")),
                       key=lambda k: at.breakdown[k])
            out.setdefault("aims", {}).setdefault(strategy, {})[engine] = {
                "target": target, "optimizer": optimizer, "peak_bytes": at.peak_bytes, "phase": at.phase,
                "breakdown": at.breakdown, "fits": at.fits(args.gpu_mem_gb, DEFAULT_RESERVE_GB),
                "largest_variable_term": term, "phases": at.phases, "terms": blocking_terms(config, target, strategy)}
    return out


def summary(rows: list[dict], lim: dict | None, gpu_mem_gb: float) -> str:
    lines = ["## Planner vs measured peak (one training step)", "",
             "| model | seq | strategy | measured MiB (" + (rows[0]["device"] if rows else "") +
             ") | analytic MiB | err % | traced MiB | err % |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["measured"]["peak_bytes"] / 2 ** 20
        lines.append(f"| {r['model']} | {r['seq_len']} | {r['strategy']} | {m:.1f} | "
                     f"{r['analytic']['peak_bytes'] / 2 ** 20:.1f} | {r['analytic']['error_pct']:+.2f} | "
                     f"{r['traced']['peak_bytes'] / 2 ** 20:.1f} | {r['traced']['error_pct']:+.2f} |")
    if rows:
        worst = {e: max(abs(r[e]["error_pct"]) for r in rows) for e in ENGINES}
        lines += ["", f"Largest |error|: analytic {worst['analytic']:.2f}%, traced {worst['traced']:.2f}%."]
    if lim:
        lines += ["", f"## Predicted max sequence length on one {gpu_mem_gb:g} GiB GPU (planner, bf16, batch 1, "
                  "default 1.5 GiB reserve)", "",
                  "| model | strategy | paper (A100 80GB, opt-in-bwd) | analytic adamw | analytic opt-in-bwd | "
                  "traced adamw | traced opt-in-bwd |", "|---|---|---|---|---|---|---|"]
        for model in ("llama3-8b", "llama2-7b"):
            for strategy in STRATEGIES:
                c = lim[model][strategy]
                cells = [f"{c[o][e]['max_seq_len']:,}" for e in ENGINES for o in ("adamw", "adamw_in_backward")]
                lines.append(f"| {model} | {strategy} | {PAPER[model][strategy]} | " + " | ".join(cells) + " |")
        lines += ["", "What-if, the paper's own implementation (traced engine with `mlp_mode=\"naive\"` and 64 LM-head "
                  "chunks, as in mini-s; optimizer-in-backward, 1024-token granularity): "
                  + ", ".join(f"{m} MsT {lim[m]['mst']['adamw_in_backward']['traced_official_code']['max_seq_len']:,}"
                              for m in ("llama3-8b", "llama2-7b")) + "."]
        lines += ["", "## Our aims (Llama3-8B, optimizer-in-backward)", "",
                  "| aim | engine | planned peak GiB | fits | phase | largest non-static term (GiB) |",
                  "|---|---|---|---|---|---|"]
        for strategy, per_engine in lim["aims"].items():
            for engine, a in per_engine.items():
                term = a["largest_variable_term"]
                lines.append(f"| {strategy} >= {a['target']:,} | {engine} | {a['peak_bytes'] / GiB:.1f} | "
                             f"{a['fits']} | {a['phase']} | {term} {a['breakdown'][term] / GiB:.1f} |")
        for strategy, per_engine in lim["aims"].items():
            a = per_engine["analytic"]
            lines += ["", f"Named terms of the {a['phase']} phase at {a['target']:,} tokens ({strategy}, GiB): "
                      + "; ".join(f"{k} {v}" for k, v in a["terms"].items()) + "."]
        lines += ["", "## Hidden-state norms in mini-sequences", "",
                  "MsT with the hidden-state norms in mini-sequences too (`mst.apply(norms=True)`; traced engine, "
                  "optimizer-in-backward, one 80 GiB GPU); variable bytes per token = the plan's activations + "
                  "transient at its peak / the length (weights and optimizer state left out).", "",
                  "| model | strategy | max seq len | with norms | peak phase (with norms) | variable bytes/token | "
                  "with norms |", "|---|---|---|---|---|---|---|"]
        for model in ("llama3-8b", "llama2-7b"):
            for strategy in ("mst", "mst_offload"):
                c = lim[model][strategy]["adamw_in_backward"]
                before, after = c["traced"], c["traced_norms"]
                per_token = [sum(x["breakdown"][k] for k in VARIABLE) / x["max_seq_len"] for x in (before, after)]
                lines.append(f"| {model} | {strategy} | {before['max_seq_len']:,} | {after['max_seq_len']:,} | "
                             f"{after['phase']} | {per_token[0] / 1e3:.1f} KB | {per_token[1] / 1e3:.1f} KB |")
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], lim: dict | None, device: str, figures: str | None) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for engine, marker in zip(ENGINES, "os"):
        ax.scatter([r["measured"]["peak_bytes"] / 2 ** 20 for r in rows], [r[engine]["error_pct"] for r in rows],
                   marker=marker, label=engine, alpha=0.7)
    ax.axhspan(-5, 5, color="green", alpha=0.1, label="±5%")
    ax.set(xscale="log", xlabel="measured peak (MiB)", ylabel="planned - measured (%)",
           title="Planner error vs measured step peak")
    ax.legend()
    save_figure(fig, figure_path("planner_errors", device, figures))
    if lim:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels, width = [f"{m}\n{s}" for m in ("llama3-8b", "llama2-7b") for s in STRATEGIES], 0.2
        for i, (engine, optimizer) in enumerate([(e, o) for e in ENGINES for o in ("adamw", "adamw_in_backward")]):
            vals = [lim[m][s][optimizer][engine]["max_seq_len"] / 1000 for m in ("llama3-8b", "llama2-7b")
                    for s in STRATEGIES]
            ax.bar([j + (i - 1.5) * width for j in range(len(vals))], vals, width, label=f"{engine}, {optimizer}")
        ax.set(xticks=range(len(labels)), ylabel="max sequence length (K tokens)", yscale="log",
               title="Planner: longest trainable sequence on one 80 GiB GPU (bf16, 1.5 GiB reserve)")
        ax.set_xticklabels(labels, fontsize=7)
        ax.legend(fontsize=7)
        save_figure(fig, figure_path("planner_limits", device, figures))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="llama3-8b", help="config whose shape is scaled down in part 1")
    parser.add_argument("--layers", type=positive_int, default=2, help="decoder layers of the part-1 models")
    parser.add_argument("--gpu-mem-gb", type=positive_float, default=80.0)
    parser.add_argument("--quick", action="store_true", help="small grid, no part 2")
    parser.add_argument("--replot", action="store_true", help="rewrite summary.md and the PNGs from the JSON results")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    add_figures_arg(parser)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        compared, lim = json.loads((out / "compare.json").read_text()), json.loads((out / "limits.json").read_text())
        write_text(out / "summary.md", summary(compared["rows"], lim, lim["gpu_mem_gb"]))
        plots(compared["rows"], lim, compared["environment"]["device_type"], args.figures)
        return
    require_device(args.device)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.set_num_threads(min(2, torch.get_num_threads()))
    env = environment(device)
    rows = compare(args, device, dtype)
    lim = None if args.quick else limits(args)
    suffix = "_quick" if args.quick else ("" if device.type == "cpu" else f"_{device.type}")
    write_json(out / f"compare{suffix}.json", {"environment": env, "rows": rows})
    if lim is not None:
        write_json(out / "limits.json", {"environment": env, "gpu_mem_gb": args.gpu_mem_gb, **lim})
    text = summary(rows, lim, args.gpu_mem_gb)
    write_text(out / f"summary{suffix}.md", text)
    if not args.quick:
        plots(rows, lim, args.device, args.figures)
    print(text)


if __name__ == "__main__":
    main()
