"""Figures and markdown tables of Tables 13-16 and the chunk-size measurement, from a results JSON (shared by
ablation.py and notebooks/table13_16_ablation.ipynb).

Memory is in GB = 1e9 bytes, the paper's unit (its 59.92 GB standard LM-head peak at S=80K matches our trace in
decimal GB; see README). Times are seconds of forward + backward of the op.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from ..results import load, save_figure  # noqa: F401  (load: re-exported for the notebooks)

GB = 1e9
PAPER_TIME_ANCHOR = {"lm_head": ("32", 0.11 / 0.01), "mlp": ("naive 8", 0.12 / 0.05)}  # S=1024, A100
OPS = {"lm_head": ("LM-head", "Table 13 (time)", "Table 14 (memory)"),
       "mlp": ("MLP", "Table 15 (time)", "Table 16 (memory)")}



def _rows(results: dict, op: str) -> dict[str, dict[int, dict]]:
    """setting -> seq_len -> row, in the order the settings were run."""
    out: dict[str, dict[int, dict]] = {}
    for r in results["rows"]:
        if r["op"] == op:
            out.setdefault(r["setting"], {})[r["seq_len"]] = r
    return out


def _gb(value: int | None) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def _style(setting: str) -> dict:
    if setting == "standard":
        return dict(color="black", lw=2.2, marker="o")
    mode, _, m = setting.rpartition(" ")
    shade = plt.cm.viridis(min(1.0, (int(m).bit_length() - 2) / 4))
    return dict(color=shade, ls="--" if mode == "naive" else "-", marker="^" if mode == "naive" else "s", ms=4)


def _full_equivalent(row: dict, scale: int) -> float | None:
    peak = row["measured"].get("peak_bytes")
    return None if peak is None else peak * scale ** 2


def figure(results: dict, out: str | Path) -> Path:
    """2 x 2: peak memory (planner full size, measured x k^2, paper) and time ratio to standard, LM-head and MLP."""
    meta = results["meta"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for col, op in enumerate(OPS):
        name, time_title, mem_title = OPS[op]
        rows = _rows(results, op)
        ax = axes[0, col]
        for setting, cells in rows.items():
            seqs = sorted(cells)
            label = f"M={setting}" if setting.isdigit() else setting.replace(" ", " M=") if setting != "standard" \
                else "standard (HF)"
            ax.plot(seqs, [cells[s]["planner"]["peak_bytes"] / GB for s in seqs], label=label, **_style(setting))
            measured = [(s, _full_equivalent(cells[s], meta["scale"])) for s in seqs]
            ax.scatter([s for s, v in measured if v], [v / GB for s, v in measured if v], s=14,
                       facecolors="none", edgecolors=_style(setting)["color"], zorder=3)
        paper = results["paper"][f"{op}_memory_gb"]
        for seq, cells in paper.items():
            for setting, value in cells.items():
                if isinstance(value, (int, float)):
                    ax.scatter([int(seq)], [value], marker="*", s=160, color="red", zorder=4)
                    ax.annotate(f"paper {setting}: {value}", (int(seq), value), fontsize=7,
                                xytext=(-90, 4), textcoords="offset points")
        ax.set(xscale="log", yscale="log", xlabel="sequence length S (tokens)", ylabel="peak memory (GB)",
               title=f"{name} {mem_title}: lines = planner, full size, bf16\n"
                     f"open circles = measured {meta['device']} x k^2 (k={meta['scale']}); red stars = paper")
        ax.legend(fontsize=6, ncol=2)
        ax = axes[1, col]
        base = rows.get("standard", {})
        for setting, cells in rows.items():
            seqs = [s for s in sorted(cells) if cells[s]["measured"].get("time_s") and base.get(s, {}).get(
                "measured", {}).get("time_s")]
            ax.plot(seqs, [cells[s]["measured"]["time_s"] / base[s]["measured"]["time_s"] for s in seqs],
                    label=setting, **_style(setting))
        ax.axhline(1.0, color="gray", lw=0.8)
        setting, paper_ratio = PAPER_TIME_ANCHOR[op]
        ax.scatter([1024], [paper_ratio], marker="*", s=160, color="red", zorder=4, label=f"paper {setting} (GPU)")
        anchors = {a["setting"]: a["time_s"] for a in results.get("anchors", []) if a["op"] == op}
        if setting in anchors:
            ax.scatter([1024], [anchors[setting] / anchors["standard"]], marker="X", s=90, color="black", zorder=4,
                       label=f"{setting}, full shapes ({meta['device']})")
        ax.legend(fontsize=6, ncol=2)
        ax.set(xscale="log", yscale="log", xlabel="sequence length S (full-size tokens)", ylabel="time / standard",
               title=f"{name} {time_title}: measured {meta['device']} ({meta['time_dtype']}, "
                     f"d={meta['measured_shapes']['d']}, S/k)\nstar: paper (A100) at S=1024; X: our full-shape anchor")
    return save_figure(fig, out, f"Tables 13-16: {meta['model']} shapes, op forward + backward, batch 1", dpi=110)


def chunk_figure(results: dict, out: str | Path) -> Path:
    """Chunk-size choice: full-size op peak (planner), measured op time, whole-model max length per option."""
    chunk = results["chunk_default"]
    meta = results["meta"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for op, marker in (("mlp", "s"), ("lm_head", "o")):
        cells = [c for c in chunk["ops"] if c["op"] == op]
        for seq in sorted({c["seq_len"] for c in cells}):
            row = sorted((c for c in cells if c["seq_len"] == seq), key=lambda c: c["setting"].startswith("M="))
            labels = [c["setting"] for c in row]
            axes[0].plot(labels, [c["planner"]["peak_bytes"] / GB for c in row], marker=marker,
                         label=f"{OPS[op][0]} S={seq // 1024}K")
            times = [c["measured"].get("time_s") for c in row]
            axes[1].plot(labels, [t or float("nan") for t in times], marker=marker,
                         label=f"{OPS[op][0]} S={seq // 1024}K")
    axes[0].set(ylabel="op peak (GB)", xlabel="chunk tokens (or the LM-head M rule)", yscale="log",
                title="planner, full size, bf16")
    axes[1].set(ylabel="seconds (fwd + bwd)", xlabel="chunk tokens (full-size equivalent)", yscale="log",
                title=f"measured {meta['device']} {meta['time_dtype']}, shapes and S / k={chunk['scale']}")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    models = chunk["max_len"]
    if models:
        colors = ["tab:blue" if m["strategy"] == "mst" else "tab:orange" for m in models]
        axes[2].barh([f"{m['strategy']}: {m['option']}" for m in models], [m["max_seq_len"] / 1000 for m in models],
                     color=colors)
        for i, m in enumerate(models):
            axes[2].text(m["max_seq_len"] / 1000, i, f" {m['max_seq_len'] / 1000:.1f}K", va="center", fontsize=7)
        axes[2].set(xlabel="max sequence length (K tokens)",
                    title=f"planner: {meta['model']}, {chunk['gpu_mem_gb']:g} GiB")
        axes[2].tick_params(axis="y", labelsize=7)
    else:
        axes[2].set_axis_off()
    return save_figure(fig, out, "Chunk sizes: MLP C = d (paper) vs larger token chunks; LM-head M = ceil(V/d) (paper) "
                       "vs token chunks", dpi=110)



def _table(results: dict, op: str, title: str, cell) -> list[str]:
    """Rows = settings, columns = S; ``cell(row, rows of the same S by setting)``."""
    rows = _rows(results, op)
    seqs = sorted({s for cells in rows.values() for s in cells})
    lines = [title, "", "| setting | " + " | ".join(f"S={s}" for s in seqs) + " |", "|---|" + "---:|" * len(seqs)]
    for setting, cells in rows.items():
        lines.append(f"| {setting} | " + " | ".join(
            cell(cells[s], {other: c[s] for other, c in rows.items() if s in c}) if s in cells else "-"
            for s in seqs) + " |")
    return lines + [""]


def markdown(results: dict) -> str:
    """Every table of the README: memory (planner full size; measured x k^2), time, anchors, chunk default."""
    meta = results["meta"]
    k = meta["scale"]
    env = results["environment"]
    where = f"{env['device']}, torch {env['versions']['torch']}, transformers {env['versions']['transformers']}"
    lines = [f"Measured on {where}; op shapes d={meta['measured_shapes']['d']}, I={meta['measured_shapes']['I']}, "
             f"V={meta['measured_shapes']['V']} and S/k (k={k}); memory measured in {meta['mem_dtype']}, "
             f"time in {meta['time_dtype']} (median of {meta['reps']} after {meta['warmup']} warm-up). "
             f"Planner: full Llama3-8B shapes, bf16. GB = 1e9 bytes.", ""]
    for op in OPS:
        name, time_title, mem_title = OPS[op]
        paper = results["paper"][f"{op}_memory_gb"]

        def planner_cell(row, _cells, paper=paper):
            value = _gb(row["planner"]["peak_bytes"])
            p = paper.get(str(row["seq_len"]), {}).get(row["setting"].split()[-1] if row["setting"] != "standard"
                                                       else "standard")
            naive_or_head = op == "lm_head" or row["setting"].startswith(("standard", "naive"))
            return f"{value} (paper {p})" if p is not None and naive_or_head else value

        def measured_cell(row, _cells):
            eq = _full_equivalent(row, k)
            return "OOM" if row["measured"].get("oom") else _gb(eq)

        def agreement(row, _cells):
            scaled, peak = row.get("planner_scaled"), row["measured"].get("peak_bytes")
            return "-" if not scaled or not peak else f"{(scaled['peak_bytes'] - peak) / peak:+.1%}"

        def time_cell(row, cells):
            t, base = row["measured"].get("time_s"), cells.get("standard")
            return "-" if t is None else f"{t:.3g}" + (
                "" if row["setting"] == "standard" else f" ({t / base['measured']['time_s']:.2f}x)")

        lines += _table(results, op, f"**{name} {mem_title}: peak GB, planner (full size, bf16)**", planner_cell)
        lines += _table(results, op, f"**{name} {mem_title}: measured {meta['device']} peak x k^2 = full-size "
                                     f"equivalent GB**", measured_cell)
        if k > 1:
            lines += _table(results, op, f"**{name}: planner vs measured at the measured (scaled) size, "
                                         f"(planner - measured) / measured**", agreement)
        lines += _table(results, op, f"**{name} {time_title}: measured {meta['device']} seconds "
                                     f"({meta['time_dtype']}, S/k), ratio to standard**", time_cell)
    anchors = {(a["op"], a["setting"]): a for a in results.get("anchors", [])}
    if anchors:
        head, mlp = anchors[("lm_head", "standard")], anchors[("mlp", "standard")]
        lines += [f"**S=1024 time anchors at the real shapes (measured {meta['device']} {meta['time_dtype']}, "
                  f"{meta['anchor_reps']} rep(s)) beside the paper's GPU numbers**", "",
                  "| op | setting | paper (A100, bf16) | measured seconds | measured ratio to standard |",
                  "|---|---|---|---:|---:|"]
        paper_text = {("lm_head", "standard"): "0.01 s", ("lm_head", "32"): "0.11 s (11x)",
                      ("mlp", "standard"): "0.05 s", ("mlp", "naive 8"): "0.12 s (2.4x)"}
        for (op, setting), a in anchors.items():
            base = head if op == "lm_head" else mlp
            lines.append(f"| {OPS[op][0]} | {setting} | {paper_text.get((op, setting), 'not reported')} | "
                         f"{a['time_s']:.2f} | {a['time_s'] / base['time_s']:.2f}x |")
        lines.append("")
    target = results["lm_head_target"]
    lines += [f"**LM-head target (issue 6): peak at S={target['seq_len']} <= {target['target_gb']} GB** (planner, "
              f"full size, bf16). Total peak: best {target['best_setting']}, met: {target['met']} (any "
              f"implementation holds W, h and returns dW, dh: {_gb(target['floor_bytes'])} GB). Working memory "
              f"(peak minus those): best {target['best_working_setting']}, met: {target['working_met']}", "",
              "| setting | total peak | weights + input + labels | returned gradients at peak | working memory | "
              "of it fp32 dW accumulator | of it logits transients (+ block accumulator) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in target["rows"]:
        lines.append(f"| {r['setting']} | {_gb(r['peak_bytes'])} | {_gb(r['static_bytes'])} | "
                     f"{_gb(r['grads_at_peak_bytes'])} | {_gb(r['intermediate_bytes'])} | "
                     f"{_gb(r['fp32_accumulator_bytes'])} | {_gb(r['logits_transient_bytes'])} |")
    measured = {r["setting"]: r["measured"] for r in target["rows"] if "measured" in r}
    if measured and "C=1024" in measured and "time_s" in measured["C=1024"]:
        k2, base = target["scale"] ** 2, measured["C=1024"]["time_s"]
        lines += ["", f"Measured at the scaled size (k={target['scale']}: S/k tokens, chunk and block / k; memory "
                      f"{meta['mem_dtype']} x k^2, time {meta['time_dtype']} against C=1024 without blocks)", "",
                  "| setting | measured peak x k^2 | planner (full size) | time | time ratio |", "|---|---:|---:|---:|---:|"]
        planner = {r["setting"]: r["peak_bytes"] for r in target["rows"]}
        for name, m in measured.items():
            if m.get("oom"):
                lines.append(f"| {name} | OOM | {_gb(planner[name])} | | |")
                continue
            lines.append(f"| {name} | {_gb(m['peak_bytes'] * k2)} | {_gb(planner[name])} | {m['time_s']:.3f} s | "
                         f"{m['time_s'] / base:.2f}x |")
    lines.append("")
    lines += chunk_markdown(results)
    return "\n".join(lines) + "\n"


def chunk_markdown(results: dict) -> list[str]:
    """The ``chunk_default`` section: op peaks and times per chunk size, and the whole-model max length."""
    chunk, meta = results["chunk_default"], results["meta"]
    seqs = sorted({c["seq_len"] for c in chunk["ops"]})
    lines = [f"**Chunk sizes (item 4)**: op peak GB (planner, full size, bf16) / measured seconds "
             f"({meta['device']} {meta['time_dtype']}, d={chunk['measured_shapes']['d']}, "
             f"I={chunk['measured_shapes']['I']}, V={chunk['measured_shapes']['V']}, S / {chunk['scale']})", "",
             "| op | chunk | " + " | ".join(f"S={s}" for s in seqs) + " |", "|---|---|" + "---:|" * len(seqs)]
    for op in ("mlp", "lm_head"):
        for setting in dict.fromkeys(c["setting"] for c in chunk["ops"] if c["op"] == op):
            cells = {c["seq_len"]: c for c in chunk["ops"] if c["op"] == op and c["setting"] == setting}
            paper_mlp = str(chunk.get("mlp_paper_tokens", chunk["mlp_default_tokens"]))
            default_mlp = f" (default, = {chunk['mlp_default_tokens'] // int(paper_mlp)}d)"
            label = f"C={setting}" + (" (paper, = d)" if setting == paper_mlp and op == "mlp"
                                      else default_mlp if setting == str(chunk["mlp_default_tokens"])
                                      and op == "mlp" else " (paper rule)" if setting.startswith("M=") else "")
            lines.append(f"| {OPS[op][0]} | {label} | " + " | ".join(
                f"{_gb(cells[s]['planner']['peak_bytes'])} / {cells[s]['measured'].get('time_s', float('nan')):.3g} s"
                if s in cells else "-" for s in seqs) + " |")
    if chunk["max_len"]:
        lines += ["", f"Whole model ({meta['model']}, MsT, {chunk['optimizer']}, bf16, planner {chunk['engine']} "
                      f"engine, {chunk['gpu_mem_gb']:g} GiB - 1.5 GiB reserve, granularity "
                      f"{chunk['max_len'][0]['granularity']}):", "",
                  f"| strategy | option | max sequence length | step peak at S={chunk['plan_seq_len']} (GiB) | "
                  "peak phase |", "|---|---|---:|---:|---|"]
        for m in chunk["max_len"]:
            lines.append(f"| {m['strategy']} | {m['option']} | {m['max_seq_len']:,} | "
                         f"{m['peak_bytes_at'] / 2 ** 30:.2f} | {m['phase_at']} |")
    return lines + [""]
