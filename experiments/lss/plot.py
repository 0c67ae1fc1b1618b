"""Figure and markdown tables of the LSS experiment from a results JSON (shared by run.py and the notebook)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from ..results import load, save_figure  # noqa: F401  (load: re-exported for the notebooks)

MiB = 1024 ** 2
STYLE = {"single": ("black", "o", "one rank (no SP)"), "lss": ("tab:red", "s", "LSS"),
         "ulysses": ("tab:blue", "^", "Ulysses"), "allgather": ("tab:gray", "v", "all-gather baseline"),
         "megatron_sp": ("tab:green", "D", "NVIDIA SP + TP (model)")}


def _curves(rows: list[dict]) -> dict[tuple[int, str], list[dict]]:
    """(kv heads, backend) -> rows by rank count, each SP curve starting at its config's one-rank point."""
    out: dict[tuple[int, str], list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["ranks"]):
        out.setdefault((r["kv_heads"], r["backend"]), []).append(r)
    for (kv, backend), curve in out.items():
        if backend != "single":
            curve[:0] = out.get((kv, "single"), [])
    return out


def figure(results: dict, out: str | Path) -> Path:
    """Three panels: counted vs modelled bytes per step, measured peak and time, the model at paper scale."""
    m, ex = results["measured"], results["extrapolation"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5.2))
    ax2b = ax2.twinx()
    heads = m["config"]["num_attention_heads"]
    for (kv, backend), rows in _curves(m["rows"]).items():
        color, marker, label = STYLE[backend]
        label = f"{label}, {'MHA' if kv == heads else f'GQA {heads}/{kv}'}"
        ls = "-" if kv == heads else "--"
        ranks = [r["ranks"] for r in rows]
        if backend != "single":
            ax1.plot(ranks, [r["wire_bytes"] / MiB for r in rows], marker=marker, color=color, ls="none",
                     label=f"{label}: counted")
            ax1.plot(ranks, [r["predicted_wire_bytes"] / MiB for r in rows], color=color, ls=ls, alpha=0.5)
        ax2.plot(ranks, [r["peak_mib"] for r in rows], marker=marker, color=color, ls=ls, label=label)
        ax2b.plot(ranks, [r["step_seconds"] for r in rows], marker=marker, color=color, ls=":", alpha=0.5)
    ax1.set(xlabel="ranks", ylabel="MiB sent per rank per step",
            title=f"bytes counted at the calls (markers) vs model (lines:\nsolid MHA, dashed GQA 8/2), "
                  f"max error {results['model_check']['max_rel_error']:.2%}")
    ax1.legend(fontsize=6)
    ax2.set(xlabel="ranks", ylabel="peak MiB per rank (solid / dashed)",
            title=f"measured ({m['device']}): peak memory, step time (dotted)\nS={m['seq_len']:,}, "
                  f"{m['config']['num_hidden_layers']} layers, d={m['config']['hidden_size']}, MsT")
    ax2b.set_ylabel("seconds per step (dotted)")
    ax2.legend(fontsize=6)
    for ax in (ax1, ax2):
        ax.set_xticks(sorted({r["ranks"] for r in m["rows"]}))
    a = ex["assumed"]
    for backend, values in ex["sweep_wire_bytes"].items():
        color, marker, label = STYLE[backend]
        pts = [(g, v) for g, v in zip(ex["sweep_gpus"], values) if v is not None]
        ax3.plot([g for g, _ in pts], [v / 1024 ** 3 for _, v in pts], marker=marker, ms=4, color=color,
                 label=label + (" (model)" if backend != "megatron_sp" else ""))
    paper = results["paper"]
    at = {pt["gpus"]: pt["wire_bytes"] for pt in ex["paper_points"]}
    for gpus in at:
        ax3.axvline(gpus, color="k", lw=0.6, ls="--")
        ax3.text(gpus, 0.9, f" {gpus:,}", transform=ax3.get_xaxis_transform(), fontsize=7)
    ratio = at[144]["megatron_sp"] / at[144]["lss"]
    ax3.text(0.98, 0.03, f"paper @144 GPUs: {paper['speedup_vs_nvidia_sp_144_gpus']}x faster, "
             f"{paper['memory_reduction_vs_nvidia_sp_144_gpus']}x less memory\nthan NVIDIA SP; "
             f"@3,456 GPUs: {paper['max_seq_len_3456_gpus']:,} tokens\n"
             f"model @144: LSS sends {ratio:.1f}x less than NVIDIA SP + TP", transform=ax3.transAxes,
             ha="right", va="bottom", fontsize=7, bbox={"fc": "white", "ec": "0.7"})
    ax3.set(xscale="log", yscale="log", xlabel="sequence-parallel GPUs (weak scaling)",
            ylabel="GiB sent per rank per step (model)",
            title=f"model, {a['tokens_per_rank']} tokens/GPU, assumed {a['layers']} layers, d={a['hidden']},\n"
                  f"{a['heads']} heads (Ulysses: P | heads), 2-byte activations")
    ax3.legend(fontsize=7)
    fig.suptitle("LSS Transformer vs DeepSpeed-Ulysses vs all-gather baseline (measured: CPU, gloo; paper: Wang et al. "
                 "2023, arXiv 2311.02382; NVIDIA SP = Megatron sequence + tensor parallelism)", fontsize=10)
    return save_figure(fig, out)


def markdown(results: dict) -> str:
    """README tables: measured per backend and rank count; the model at the paper's scales."""
    m, ex, check = results["measured"], results["extrapolation"], results["model_check"]
    c = m["config"]
    lines = [f"Measured on {m['device']} (gloo), torch {m['torch']}, transformers {m['transformers']}: "
             f"character-level Llama ({c['num_hidden_layers']} layers, d={c['hidden_size']}, "
             f"{c['num_attention_heads']} heads of {c['head_dim']}, vocab {c['vocab_size']}), "
             f"{m['corpus']}, S={m['seq_len']:,} tokens per step, MsT ({m['strategy']}), fp32, AdamW; "
             f"median of {m['steps']} steps.", "",
             "| kv heads | backend | ranks | paper | collectives / step | MiB sent / rank / step (counted) | model | "
             "error | peak MiB / rank | s / step | loss (step 1) |",
             "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(m["rows"], key=lambda r: (-r["kv_heads"], r["ranks"], list(STYLE).index(r["backend"]))):
        lines.append(f"| {r['kv_heads']} | {STYLE[r['backend']][2]} | {r['ranks']} | not reported | {r['calls']} | "
                     f"{r['wire_bytes'] / MiB:.2f} | {r['predicted_wire_bytes'] / MiB:.2f} | "
                     f"{r['rel_error']:.2%} | {r['peak_mib']:.1f} | {r['step_seconds']:.2f} | {r['losses'][0]:.4f} |")
    lines += ["", f"Communication model vs counts: max error {check['max_rel_error']:.2%} "
                  f"(target <= {check['tolerance']:.0%}: {'met' if check['met'] else 'NOT met'}).", ""]
    a, p = ex["assumed"], results["paper"]
    names = ("lss", "ulysses", "allgather", "megatron_sp")
    lines += [f"Model at the paper's scales ({a['tokens_per_rank']} tokens per GPU in the sequence group; assumed "
              f"{a['layers']} layers, d={a['hidden']}, {a['heads']} heads, {a['act_bytes']}-byte activations, "
              f"{a['params'] / 1e6:.0f}M parameters; no recomputation): GiB sent per rank per step.", "",
              "| GPUs (sequence x data) | sequence | " + " | ".join(STYLE[n][2] for n in names) +
              " | paper |", "|---|---:|" + "---:|" * len(names) + "---|"]
    claims = {144: f"{p['speedup_vs_nvidia_sp_144_gpus']}x faster, {p['memory_reduction_vs_nvidia_sp_144_gpus']}x "
                   "less memory than NVIDIA SP",
              3456: f"{p['max_seq_len_3456_gpus']:,} tokens, {p['parallel_efficiency_3456_gpus']:.0%} efficiency, "
                    f"{p['petaflops_3456_gpus']} PF"}
    for pt in ex["paper_points"]:
        cells = [f"{pt['wire_bytes'][n] / 1024 ** 3:.2f}" if pt["wire_bytes"][n] is not None else "n/a (heads)"
                 for n in names]
        lines.append(f"| {pt['gpus']:,} ({pt['sp']} x {pt['dp']}) | {pt['seq_len']:,} | " + " | ".join(cells) +
                     f" | {claims.get(pt['gpus'], 'not reported')} |")
    return "\n".join(lines) + "\n"
