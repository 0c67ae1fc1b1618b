"""Figure and markdown table of Table 12 from a results JSON (shared by run.py and the figures notebook: both
only read results and draw)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from ..results import load, save_figure  # noqa: F401  (load: re-exported for the notebooks)

PLANNER_TICKS = (1, 2, 4, 8)
STYLE = {"vanilla": ("tab:gray", "o", "vanilla Ulysses"), "mst": ("tab:blue", "s", "MsT + Ulysses")}


def figure(results: dict, out: str | Path) -> Path:
    """Two panels: measured max length vs ranks (with ideal linear scaling), planner's 8B-scale prediction."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    measured = results["measured"]
    for strategy, (color, marker, label) in STYLE.items():
        rows = sorted((r for r in measured["rows"] if r["strategy"] == strategy), key=lambda r: r["ranks"])
        if not rows:
            continue
        ranks = [r["ranks"] for r in rows]
        ax1.plot(ranks, [r["max_seq_len"] for r in rows], marker=marker, color=color, label=label)
        base = next((r["max_seq_len"] for r in rows if r["ranks"] == 1), None)
        if base:
            ax1.plot(ranks, [base * n for n in ranks], ls=":", color=color, alpha=0.6)
    ax1.set(xlabel="ranks (sequence-parallel size)", ylabel="max sequence length (tokens)",
            title=f"measured ({measured['device']}, {measured['model']} model), "
                  f"{measured['budget_mib']:g} MiB / rank\ndotted: linear scaling from 1 rank")
    ax1.set_xticks(sorted({r["ranks"] for r in measured["rows"]}))
    ax1.legend()
    planner = results.get("planner", {})
    for model, ls in (("llama3-8b", "-"), ("llama2-7b", "--")):
        for strategy, (color, marker, label) in STYLE.items():
            cells = planner.get("models", {}).get(model, {}).get(strategy, {})
            gpus = sorted(int(g) for g in cells)
            if gpus:
                ax2.plot(gpus, [cells[str(g)] / 1000 for g in gpus], ls=ls, marker=marker, color=color,
                         label=f"{model} {label}")
    if planner:
        ax2.set(xlabel="GPUs (sequence-parallel size)", ylabel="max sequence length (K tokens)",
                title=f"planner prediction (full size): {planner['gpu_mem_gb']:g} GiB GPUs,\n"
                      f"{planner['optimizer']}, {planner['dtype']}, batch 1")
        ax2.set_xticks(list(PLANNER_TICKS))
        ax2.legend(fontsize=7)
    else:
        ax2.set_axis_off()
        ax2.text(0.5, 0.5, "planner not available", ha="center")
    fig.suptitle("Table 12: max sequence length vs ranks (paper: no numbers, claims linear scaling)")
    return save_figure(fig, out)


def markdown(results: dict) -> str:
    """The README table: paper | planner | measured (device), plus the scaling efficiency."""
    measured = results["measured"]
    lines = [f"Measured on {measured['device']} ({measured['accelerator']}), {measured['model_label']}, "
             f"per-rank budget {measured['budget_mib']:g} MiB, fp32, AdamW, batch 1.", "",
             "| strategy | ranks | paper | planner (same scaled model) | measured max length | "
             "efficiency S(N) / (N S(1)) | step time at max (s) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in sorted(measured["rows"], key=lambda r: (r["strategy"] != "vanilla", r["ranks"])):
        eff = f"{r['efficiency']:.3f}" if r["efficiency"] is not None else "-"
        plan, seconds = r.get("planner"), r["step_seconds_at_max"]
        seconds = f"{seconds:.2f}" if seconds is not None and seconds == seconds else "-"  # none fits: None (NaN)
        lines.append(f"| {STYLE[r['strategy']][2]} | {r['ranks']} | not reported | "
                     f"{plan if plan is not None else 'n/a'} | {r['max_seq_len']} | {eff} | {seconds} |")
    planner = results.get("planner")
    if planner:
        gpus = sorted({int(g) for m in planner["models"].values() for s in m.values() for g in s})
        lines += ["", f"Planner (`mst.memory.max_seq_len`), full-size models on {planner['gpu_mem_gb']:g} GiB GPUs "
                      f"minus a {planner.get('reserve_gb', 0):g} GiB reserve ({planner['optimizer']}, "
                      f"{planner['dtype']}, batch 1); paper Table 12: not reported (claims linear scaling).", "",
                  "| model | strategy | " + " | ".join(f"{g} GPU" for g in gpus) + " |",
                  "|---|---|" + "---:|" * len(gpus)]
        for model, strategies in planner["models"].items():
            for strategy, cells in strategies.items():
                lines.append(f"| {model} | {STYLE[strategy][2]} | " +
                             " | ".join(f"{cells.get(str(g), 0):,}" for g in gpus) + " |")
    return "\n".join(lines) + "\n"
