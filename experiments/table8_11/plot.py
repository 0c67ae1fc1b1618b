"""Markdown and figures of Tables 8-11, Figures 7-11 and Figure 3 from a results JSON (run.py and the notebook)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from ..results import load, save_figure  # noqa: F401  (load: re-exported for the notebooks)

GiB, MiB = 1024 ** 3, 1024 ** 2
COMPONENTS = ("weights", "gradients", "optimizer_state", "activations", "transient")
COLORS = {"weights": "tab:blue", "gradients": "tab:orange", "optimizer_state": "tab:green",
          "activations": "tab:red", "transient": "tab:purple"}
PHASE_COLORS = {"forward": "tab:blue", "backward": "tab:red", "after_backward": "tab:green"}



def components(cell: dict) -> dict[str, int]:
    """The five Table 8-11 components of a measured or planned cell (buffers count as weights, other as transient)."""
    b = cell["breakdown"]
    parts = {k: b.get(k, 0) for k in COMPONENTS}
    parts["weights"] += b.get("buffers", 0)
    parts["transient"] += b.get("other", 0)
    return parts


def _fmt(value, scale: float, digits: int = 1) -> str:
    return "not reported" if value is None else f"{value / scale:.{digits}f}"


def markdown(results: dict) -> str:
    """The tables: paper; the planner at full size; the scaled model's measurement beside the planner for that same
    scaled setting (two scales, never converted into each other)."""
    scale = results["scale"]
    lines = [f"# Tables 8-11: memory of one Llama3-8B training step at 4K tokens, batch 1 "
             f"({results['environment']['device']})", "",
             f"measured: scaled Llama3-8B (d={scale['hidden']}, L={scale['layers']}, V={scale['vocab']}, "
             f"I={scale['intermediate']}) at {results['ladder']['table8']['seq_len']} tokens, {results['dtype']}, "
             f"MemTracker at the step's peak, beside the planner for that same setting. planner, full size: "
             f"Llama3-8B, bf16, `mst.memory.plan`.", "",
             "| table | configuration | source | weights | gradients | optimizer state | activations | "
             "transient | peak |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for table, row in results["ladder"].items():
        paper = results["paper"][table]
        config = f"{row['label']} ({row['strategy']}, {row['optimizer']})"
        lines.append(f"| {table} | {config} | paper (GB) | " +
                     " | ".join(_fmt(paper[k], 1, 0) for k in (*COMPONENTS, "peak")) + " |")
        sources = [("planner, full size (GiB)", row["planner_full"], GiB), ("measured, scaled (MiB)", row["measured"], MiB)]
        if "planner_same_setting" in row:
            sources.append(("planner, same scaled setting (MiB)", row["planner_same_setting"], MiB))
        for label, cell, unit in sources:
            parts = components(cell)
            lines.append(f"| {table} | {config} | {label} | " +
                         " | ".join(_fmt(parts[k], unit) for k in COMPONENTS) +
                         f" | {_fmt(cell['peak_bytes'], unit)} |")
    lines += ["", f"Figure 11 (paper, approximate): standard peak {results['paper']['fig11']['vanilla_peak']} GB, "
                  f"MsT {results['paper']['fig11']['mst_peak']} GB ({results['paper']['fig11']['note']}).", "",
              "# Figure 3: memory at S = 20K, batch 1, optimizer-in-backward", "",
              f"Paper: {results['paper']['fig3']}.", "",
              "| model | strategy | source | weights | optimizer state | activations + transient | gradients | peak |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for model, cells in results["fig3"].items():
        for strategy, cell in cells.items():
            for label, data, unit in (("planner, full size (GiB)", cell["planner_full"], GiB),
                                      (f"measured, scaled at {cell['seq_len']} tok (MiB)", cell["measured"], MiB)):
                parts = components(data)
                lines.append(f"| {model} | {strategy} | {label} | {_fmt(parts['weights'], unit)} | "
                             f"{_fmt(parts['optimizer_state'], unit)} | "
                             f"{_fmt(parts['activations'] + parts['transient'], unit)} | "
                             f"{_fmt(parts['gradients'], unit)} | {_fmt(data['peak_bytes'], unit)} |")
    return "\n".join(lines) + "\n"


def _stack(ax, x: float, parts: dict[str, float], width: float, hatch: str | None = None, label: bool = False):
    bottom = 0.0
    for key in (k for k in COMPONENTS if k in parts):
        value = parts[key] or 0.0
        ax.bar(x, value, width, bottom=bottom, color=COLORS[key], hatch=hatch, edgecolor="white",
               label=key.replace("_", " ") if label else None)
        bottom += value


def breakdown_figure(results: dict, out: str | Path) -> Path:
    """Tables 8-11 as stacked bars: full size (paper peak where printed, planner) and, in a second panel, the scaled
    model measured beside the planner for that same setting."""
    fig, (full, small) = plt.subplots(1, 2, figsize=(13, 4.5))
    tables = list(results["ladder"])
    for i, table in enumerate(tables):
        row, paper = results["ladder"][table], results["paper"][table]
        full.bar(i - 0.2, paper["peak"], 0.35, color="lightgray", edgecolor="black",
                 label="paper peak (GB)" if i == 0 else None)
        full.text(i - 0.2, paper["peak"] + 1, f"{paper['peak']}", ha="center", fontsize=7)
        _stack(full, i + 0.2, {k: v / GiB for k, v in components(row["planner_full"]).items()}, 0.35, label=i == 0)
        _stack(small, i - 0.2, {k: v / MiB for k, v in components(row["measured"]).items()}, 0.35, "//", label=i == 0)
        if "planner_same_setting" in row:
            _stack(small, i + 0.2, {k: v / MiB for k, v in components(row["planner_same_setting"]).items()}, 0.35)
    labels = [f"{t}\n{results['ladder'][t]['label']}" for t in tables]
    full.set_xticks(range(len(tables)), labels, fontsize=7)
    small.set_xticks(range(len(tables)), labels, fontsize=7)
    full.set(ylabel="GiB", title="full-size Llama3-8B, 4K: paper peak (gray), planner (bars)")
    small.set(ylabel="MiB", title=f"scaled model, {results['ladder']['table8']['seq_len']} tokens: measured "
                                  "(hatched), planner same setting")
    full.title.set_fontsize(9)
    small.title.set_fontsize(9)
    full.legend(fontsize=7, ncol=2)
    small.legend(fontsize=7, ncol=2)
    return save_figure(fig, out, title=f"Tables 8-11 ({results['environment']['device']})")


def timeline_figure(results: dict, out: str | Path) -> Path:
    """Figures 7-10 (one panel per configuration, coloured by phase) and Figure 11 (vanilla vs MsT overlaid), as
    measured on the scaled model (MiB)."""
    ladder = results["ladder"]
    fig, axes = plt.subplots(1, len(ladder) + 1, figsize=(4 * (len(ladder) + 1), 3.4), sharey=True)
    for ax, (table, row) in zip(axes, ladder.items()):
        tl = row["measured"]["timeline"]
        ys = [b / MiB for b in tl["bytes"]]
        xs = range(len(ys))
        for phase, color in PHASE_COLORS.items():
            ax.fill_between(xs, ys, where=[p == phase for p in tl["phase"]], color=color, alpha=0.6, lw=0,
                            step="mid", label=phase)
        parts = components(row["measured"])
        ax.axhline((parts["weights"] + parts["optimizer_state"]) / MiB, color="black", ls=":", lw=1,
                   label="weights + optimizer state")
        ax.set_title(f"{row['figure']} ({table}): {row['label']}\npeak {max(ys):.1f} MiB (paper, full size: "
                     f"{results['paper'][table]['peak']} GB)", fontsize=8)
        ax.set_xlabel(f"op index (x{tl['bin']})", fontsize=8)
    axes[0].set_ylabel("live MiB (scaled model)")
    axes[0].legend(fontsize=7, loc="upper left")
    ax = axes[-1]
    for table, color in (("table9", "tab:gray"), ("table11", "tab:blue")):
        tl = ladder[table]["measured"]["timeline"]
        xs = [i / max(1, len(tl["bytes"]) - 1) for i in range(len(tl["bytes"]))]
        ax.plot(xs, [b / MiB for b in tl["bytes"]], color=color, label=ladder[table]["label"])
    f11 = results["paper"]["fig11"]
    ax.set_title(f"fig11: standard vs MsT (paper, full size: ~{f11['vanilla_peak']} vs ~{f11['mst_peak']} GB)",
                 fontsize=8)
    ax.set_xlabel("fraction of the step", fontsize=8)
    ax.legend(fontsize=7)
    return save_figure(fig, out, title=f"Figures 7-11: memory over one training step of the scaled Llama3-8B "
                                       f"(4K scaled to {ladder['table8']['seq_len']} tokens), measured on "
                                       f"{results['environment']['device']}")


def fig3_figure(results: dict, out: str | Path) -> Path:
    """Figure 3: stacked bars at S = 20K (weights, optimizer, activations + transient; gradients not shown, as in
    the paper): the planner at full size (top row) and the scaled model measured (bottom row)."""
    models = results["fig3"]
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 6.5), squeeze=False)
    for col, (model, cells) in enumerate(models.items()):
        for row, (key, unit, name) in enumerate((("planner_full", GiB, "GiB"), ("measured", MiB, "MiB"))):
            ax = axes[row][col]
            for i, cell in enumerate(cells.values()):
                parts = components(cell[key])
                bars = {"weights": parts["weights"], "optimizer_state": parts["optimizer_state"],
                        "activations": parts["activations"] + parts["transient"]}
                _stack(ax, i, {k: v / unit for k, v in bars.items()}, 0.6, label=i == 0 and col == 0 and row == 0)
            if row == 0:
                ax.axhline(80, color="black", ls="--", lw=1, label="80 GB (A100)" if col == 0 else None)
                ax.set_title(f"{model}, S = 20K: planner, full size", fontsize=8)
            else:
                ax.set_title(f"{model}: measured, scaled model at {next(iter(cells.values()))['seq_len']} tokens",
                             fontsize=8)
            ax.set_xticks(range(len(cells)), list(cells))
            ax.set_ylabel(name)
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, out, title="Figure 3: memory at 20K tokens, batch 1, optimizer-in-backward "
                                       "(paper: bar heights not reported)")
