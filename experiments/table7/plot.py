"""Loss-curve figure of Table 7 from committed results (used by run.py and notebooks/table7_convergence.ipynb).

Panels: (a) fp32 vanilla vs MsT, (b) bf16 vanilla vs MsT vs vanilla's own noise run, (c) short context with
activation recomputation vs the longer context MsT fits in the same memory. Each panel reads the per-run CSV logs
in ``curves/`` and annotates the numbers from the results JSON.
"""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.pyplot as plt


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of one run's log.csv."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def make_figure(record: dict, curves: str | Path) -> plt.Figure:
    """The three-panel figure for a ``table7_<device>.json`` record; panels without results are left out."""
    curves = Path(curves)
    panels = [p for p in ("exact", "bf16", "context") if p in record]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 3.8), squeeze=False)
    device = record.get("meta", {}).get("device", "?")
    for ax, panel in zip(axes[0], panels):
        res = record[panel]
        if panel == "exact":
            for name, style in (("vanilla", dict(lw=2.5, alpha=0.5)), ("mst", dict(ls="--", marker=".", lw=1))):
                ax.plot(*read_curve(curves / f"exact_fp32_{name}.csv"), label=name, **style)
            ax.set_title(f"(a) fp32, {res['model']}, context {res['context']}\n"
                         f"max |dloss| = {res['max_abs_dloss']:.2e} (rel {res['max_rel_dloss']:.1e})")
        elif panel == "bf16":
            for name, style in (("vanilla", dict(lw=2.5, alpha=0.5)), ("mst", dict(ls="--", marker=".", lw=1)),
                                ("vanilla_reverse", dict(ls=":", lw=1.5))):
                ax.plot(*read_curve(curves / f"bf16_{name}.csv"), label=name, **style)
            ax.set_title(f"(b) bf16, {res['model']}, context {res['context']}\n"
                         f"max |dloss| MsT {res['mst_vs_vanilla']['max_abs_dloss']:.2e}, "
                         f"noise {res['noise_vanilla_reverse_vs_vanilla']['max_abs_dloss']:.2e}")
        else:
            for strategy, label in (("ac", "AC"), ("mst", "MsT")):
                run = res["runs"][strategy]
                ppl = run["heldout_own_context"]["ppl"]
                ax.plot(*read_curve(curves / f"context_{strategy}_{run['context']}.csv"), lw=1.5,
                        label=f"{label} @ {run['context']} (held-out ppl {ppl:.1f})")
            ax.set_title(f"(c) same memory budget ({res['budget_bytes'] / 2 ** 20:.0f} MiB)\n"
                         f"held-out ppl ratio AC/MsT = {res['ppl_ratio_ac_over_mst']:.2f} (paper: 2.7)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Table 7 convergence, measured on {device}", fontsize=10)
    fig.tight_layout()
    return fig
