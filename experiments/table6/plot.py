"""Markdown table and figure of Table 6 from a results JSON (shared by run.py and the notebook)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from ..results import load, save_figure  # noqa: F401  (load: re-exported for the notebooks)

COLORS = {"vanilla": "tab:gray", "ac": "tab:orange", "mst": "tab:blue", "mst_no_ac": "tab:cyan",
          "mst_mlp_unsplit": "tab:green", "mst_lm_head_unchunked": "tab:purple", "mst_norms": "tab:red",
          "mst_attention": "tab:brown", "mst_norms_attention": "tab:pink"}



def _paper(results: dict, group: dict, variant: str) -> str:
    value = results["paper"].get(f"{group['model']}/{group['full_seq']}/{group['batch']}/{variant}")
    if value is None:
        return "not reported"
    if value == "OOM":
        return "OOM"
    tps, sps = value
    return f"{tps:,.0f} tok/s, {sps if sps is not None else 'not reported'} s"


def markdown(results: dict) -> str:
    load_avg = results["load_average"]
    lines = [f"# Table 6: training throughput ({results['environment']['device']}, {results['dtype']}, {results['optimizer']})", "",
             f"Median over {results['steps']} round-robin rounds after {results['warmup']} warm-up round(s); "
             f"IQR in brackets. Load average (1/5/15 min) at start {', '.join(f'{x:.1f}' for x in load_avg['start'])}"
             f", at end {', '.join(f'{x:.1f}' for x in load_avg['end'])}. Paper: A100 80G, full size; its "
             "\"TFLOPS\" column is tokens/s.", "",
             "| model | seq (full) | seq (run) | batch | strategy | paper | measured tokens/s [IQR] | "
             "measured s/step [IQR] |", "|---|---:|---:|---:|---|---|---:|---:|"]
    for g in results["groups"]:
        for variant, cell in g["cells"].items():
            if cell.get("oom"):
                meas = "OOM | OOM"
            else:
                lo, hi = cell["tokens_per_s_iqr"]
                a, b = cell["iqr_s"]
                meas = (f"{cell['tokens_per_s']:,.0f} [{lo:,.0f}-{hi:,.0f}] | "
                        f"{cell['s_per_step']:.3f} [{a:.3f}-{b:.3f}]")
            lines.append(f"| {g['model']} | {g['full_seq']} | {g['seq_len']} | {g['batch']} | {variant} | "
                         f"{_paper(results, g, variant)} | {meas} |")
    lb = results["larger_batch"]
    if lb:
        lines += ["", "Larger batch at equal memory (Llama3-8B, 8K; CPU: Table 2 budget rule at the scaled size):", "",
                  "| strategy | max batch (measured) | planner, same setting | planner, full size 80 GB | tokens/s [IQR] "
                  "| s/step |", "|---|---:|---:|---:|---:|---:|"]
    for variant, cell in lb.items():
        lo, hi = cell["tokens_per_s_iqr"]
        lines.append(f"| {variant} | {cell['max_batch']} | {cell['planner_same_setting']} | {cell['planner_full']} | "
                     f"{cell['tokens_per_s']:,.0f} [{lo:,.0f}-{hi:,.0f}] | {cell['s_per_step']:.3f} |")
    lines += ["", "| ratio (tokens/s) | measured |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in results["ratios"].items()]
    lines += [f"| paper: {k} | {v:.3f} |" for k, v in results["paper_ratios"].items()]
    lines += [f"| target: {k} | >= {v} |" for k, v in results["targets"].items()]
    extra = results.get("mlp_extra_forward")
    if extra:
        passes = ", ".join(f"{k} {v:.2f}" for k, v in extra["passes_per_step"].items())
        lines += ["", f"MLP forward passes per step (tokens through the MLP / (batch x seq x layers), "
                      f"{extra['model']} S={extra['seq_len']} b={extra['batch']}): {passes}. One pass over all "
                      f"layers: {extra['one_pass_s'] * 1e3:.1f} ms."]
    return "\n".join(lines) + "\n"


def figure(results: dict, out: str | Path) -> Path:
    """Left: measured tokens/s per group and strategy (IQR bars). Right: throughput ratios, paper vs measured."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    x, labels = 0, []
    for g in results["groups"]:
        for variant, cell in g["cells"].items():
            if not cell.get("oom"):
                lo, hi = cell["tokens_per_s_iqr"]
                ax1.bar(x, cell["tokens_per_s"], color=COLORS[variant],
                        yerr=[[cell["tokens_per_s"] - lo], [hi - cell["tokens_per_s"]]], capsize=2)
            else:
                ax1.text(x, 0, "OOM", ha="center", va="bottom", fontsize=7)
            labels.append(f"{g['model'].split('-')[0]} b={g['batch']}\n{variant}")
            x += 1
    for variant, cell in results["larger_batch"].items():
        ax1.bar(x, cell["tokens_per_s"], color=COLORS[variant], hatch="//", edgecolor="white")
        labels.append(f"llama3 max b={cell['max_batch']}\n{variant}")
        x += 1
    ax1.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
    ax1.set_ylabel("tokens/s (median, IQR)")
    scale = "" if results["hidden"] is None else f", scaled models d={results['hidden']}"
    ax1.set_title(f"measured on {results['environment']['device']}, {results['dtype']}{scale}", fontsize=8)
    paper = results["paper_ratios"]
    measured = results["ratios"]
    pairs = [("MsT/AC, equal batch", paper["mst/ac equal batch (llama3-8b, b=2)"],
              next((v for k, v in measured.items() if k.startswith("mst/ac llama3-8b b=2")), None)),
             ("MsT/AC, larger batch", paper["mst b=8 / ac b=2 (llama3-8b, larger batch)"],
              next((v for k, v in measured.items() if "equal memory" in k), None)),
             ("MsT no AC / vanilla", paper["mst_no_ac/vanilla (llama2-7b, b=1)"],
              next((v for k, v in measured.items() if k.startswith("mst_no_ac/vanilla")), None))]
    for i, (label, p, m) in enumerate(pairs):
        ax2.bar(i - 0.2, p, 0.4, color="lightgray", edgecolor="black", label="paper (A100)" if i == 0 else None)
        ax2.bar(i + 0.2, m or 0, 0.4, color="tab:blue", label="measured" if i == 0 else None)
        ax2.text(i + 0.2, (m or 0) + 0.01, f"{m:.3f}" if m else "-", ha="center", fontsize=7)
        ax2.text(i - 0.2, p + 0.01, f"{p:.3f}", ha="center", fontsize=7)
    ax2.axhline(1.0, color="black", lw=0.8, ls=":")
    ax2.set_xticks(range(len(pairs)), [p[0] for p in pairs], fontsize=8)
    ax2.set_ylabel("tokens/s ratio")
    ax2.legend(fontsize=7)
    fig.suptitle("Table 6: throughput (the paper's \"TFLOPS\" column is tokens/s)", fontsize=9)
    return save_figure(fig, out)
