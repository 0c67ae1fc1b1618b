"""Tables 8-11, Figures 7-11 and Figure 3 (MsT paper, App. D and Sec. 1): where the memory of a training step goes.

    bash experiments/table8_11/run.sh                   # CPU: scaled Llama3-8B / Gemma-2-9B + full-size planner (~3 min)
    bash experiments/table8_11/run.sh --device cuda     # full-size models, CUDA memory snapshots (random weights)

The ladder of Tables 8-11 at 4K tokens, batch 1: vanilla + AdamW (Table 8, Fig. 7) -> + optimizer-in-backward
(Table 9, Fig. 8) -> + activation checkpointing (Table 10, Fig. 9) -> + MsT (Table 11, Fig. 10); Fig. 11 overlays
the vanilla and MsT timelines. Each configuration runs one warm-up step (so optimizer state exists), one step under
``mst.memory.measure_peak`` (MemTracker breakdown: weights, gradients, optimizer_state, activations, transient) and
one step under ``mst.memory.timeline.record_timeline`` (live bytes after every op on CPU; the CUDA allocator's
history on GPU). Figure 3 is the same breakdown for vanilla / AC / MsT (optimizer-in-backward) at S = 20K for
Llama3-8B and Gemma-2-9B.

CPU mode measures the scaled models of ``experiments.models.model_config`` (hidden d_s = 128, same layers and V/d,
I/d, GQA) at S_s = S x k (k = d_s / d, the Table 2 length scale), fp32, beside the planner (``mst.memory.plan``) for
that same scaled setting, which checks it; the planner alone gives the full-size rows. The two scales are reported
side by side, never converted into each other (one full-size estimate per cell: the validated planner).
Gemma-2 is measured with SDPA-causal attention and no attention softcap or sliding window (``flash_equivalent``:
memory-equivalent to the paper's FlashAttention-2; HF's eager Gemma-2 attention would materialise S x S scores).
Outputs: results/table8_11_<device>.{json,md}; paper_figures/fig7_11_memory_breakdown.png,
fig7_11_memory_timelines.png and fig3_memory_20k.png (``_cuda`` before .png for a GPU run).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from mst.configs import load_config
from mst.memory import measure_peak, plan
from mst.memory.measure import free_memory
from mst.memory.strategies import make_train_step, prepare
from mst.memory.timeline import record_timeline

from ..cli import add_scaled_model_args, resolve_device
from ..models import build_model, model_config
from ..results import environment, figure_path, write_results
from .plot import breakdown_figure, fig3_figure, markdown, timeline_figure

HERE = Path(__file__).resolve().parent
LADDER = (  # (table, figure, strategy, optimizer, label)
    ("table8", "fig7", "vanilla", "adamw", "vanilla"),
    ("table9", "fig8", "vanilla", "adamw_in_backward", "+ optimizer-in-backward"),
    ("table10", "fig9", "ac", "adamw_in_backward", "+ activation checkpointing"),
    ("table11", "fig10", "mst", "adamw_in_backward", "+ MsT"),
)
FIG3 = (("llama3-8b", ("vanilla", "ac", "mst")), ("gemma2-9b", ("vanilla", "ac", "mst")))
LADDER_SEQ, FIG3_SEQ = 4096, 20000

# docs/paper.md §1 Tables 8-11 (GB, A100 80G, Llama3-8B 4K); None = not reported
PAPER = {
    "table8": {"weights": 15, "gradients": 15, "optimizer_state": 30, "activations": 29, "transient": 15, "peak": 75,
               "note": "exact prose; 'optimizer intermediates' 15 GB = transient"},
    "table9": {"weights": 15, "gradients": None, "optimizer_state": 30, "activations": 29, "transient": None,
               "peak": 74, "note": "exact"},
    "table10": {"weights": 15, "gradients": None, "optimizer_state": 30, "activations": 7, "transient": None,
                "peak": 52, "note": "exact"},
    "table11": {"weights": 15, "gradients": None, "optimizer_state": 30, "activations": 4, "transient": None,
                "peak": 49, "note": "activations exact; peak inferred 15 + 30 + 4"},
    "fig11": {"vanilla_peak": 67, "mst_peak": 47, "note": "approximate; MsT 47 GB in the text, 48 GB in the figure"},
    "fig3": "bar heights not reported; text: AC cuts Llama3 activations 3x, MsT another 4x",
}
MAX_TIMELINE_POINTS = 1500


def scaled_model_config(name: str, args):
    """The scaled config (CPU) or the full one (CUDA); Gemma-2 on CPU with memory-equivalent-to-flash attention."""
    return model_config(name, args.device, args.hidden, args.layers)


def downsample(events: list[tuple[str, int]], points: int = MAX_TIMELINE_POINTS) -> dict:
    """Keep the maximum of each bin (the peak survives), with the phase of the bin's first event."""
    size = max(1, -(-len(events) // points))
    bins = [events[i:i + size] for i in range(0, len(events), size)]
    return {"events": len(events), "bin": size, "bytes": [max(b for _, b in chunk) for chunk in bins],
            "phase": [chunk[0][0].split(":")[0] for chunk in bins],
            "peak_event": max(events, key=lambda e: e[1])[0] if events else None}


def measure(name: str, strategy: str, optimizer: str, seq_len: int, args, timeline: bool) -> dict:
    """Warm-up step, then the breakdown of one step, then (optionally) the timeline of one more."""
    device = torch.device(args.device)
    model = prepare(build_model(scaled_model_config(name, args), device=device, dtype=args.dtype), strategy)
    step, track = make_train_step(model, optimizer=optimizer)
    step(seq_len)
    report = measure_peak(lambda: step(seq_len), track, device)
    cell = {"peak_bytes": report.allocator_peak_bytes or report.peak_bytes, "tracker_peak_bytes": report.peak_bytes,
            "breakdown": report.breakdown}
    if timeline:
        events = record_timeline(lambda: step(seq_len), track, device,
                                 snapshot_path=Path(args.out) / f"snapshot_{strategy}_{optimizer}.pickle"
                                 if device.type == "cuda" else None)
        cell["timeline"] = downsample(events)
    del model, step, track
    free_memory()
    return cell


def planned(config, seq_len: int, strategy: str, optimizer: str, **kwargs) -> dict:
    p = plan(config, seq_len, strategy, optimizer=optimizer, **kwargs)
    return {"peak_bytes": p.peak_bytes, "breakdown": p.breakdown, "phase": p.phase}


def run(args) -> dict:
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    results = {"environment": environment(device), "dtype": str(args.dtype).replace("torch.", ""), "batch_size": 1,
               "paper": PAPER, "ladder": {}, "fig3": {}}
    with tqdm(total=len(LADDER) + sum(len(s) for _, s in FIG3), desc="table8_11", unit="config") as bar:
        full = load_config("llama3-8b")
        small = scaled_model_config("llama3-8b", args)
        k = small.hidden_size / full.hidden_size
        seq = max(16, round(LADDER_SEQ * k))
        results["scale"] = {"model": "llama3-8b", "hidden": small.hidden_size, "layers": small.num_hidden_layers,
                            "vocab": small.vocab_size, "intermediate": small.intermediate_size, "k": k}
        for table, figure, strategy, optimizer, label in LADDER:
            bar.set_postfix_str(f"{table} {strategy} {optimizer} S={seq}")
            row = {"figure": figure, "strategy": strategy, "optimizer": optimizer, "label": label, "seq_len": seq,
                   "measured": measure("llama3-8b", strategy, optimizer, seq, args, timeline=True),
                   "planner_full": planned(full, LADDER_SEQ, strategy, optimizer)}
            if cpu:
                row["planner_same_setting"] = planned(small, seq, strategy, optimizer, dtype=args.dtype, device="cpu")
            results["ladder"][table] = row
            bar.update(1)
        for name, strategies in FIG3:
            full_cfg, small_cfg = load_config(name), scaled_model_config(name, args)
            seq = max(16, round(FIG3_SEQ * small_cfg.hidden_size / full_cfg.hidden_size))
            for strategy in strategies:
                bar.set_postfix_str(f"fig3 {name} {strategy} S={seq}")
                results["fig3"].setdefault(name, {})[strategy] = {
                    "seq_len": seq, "optimizer": "adamw_in_backward",
                    "measured": measure(name, strategy, "adamw_in_backward", seq, args, timeline=False),
                    "planner_full": planned(full_cfg, FIG3_SEQ, strategy, "adamw_in_backward")}
                bar.update(1)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scaled_model_args(p, HERE / "results")
    args = p.parse_args(argv)
    out = resolve_device(args)
    results = run(args)
    stem = out / f"table8_11_{args.device}"
    write_results(stem, results, markdown(results))
    breakdown_figure(results, figure_path("fig7_11_memory_breakdown", args.device, args.figures))
    timeline_figure(results, figure_path("fig7_11_memory_timelines", args.device, args.figures))
    fig3_figure(results, figure_path("fig3_memory_20k", args.device, args.figures))
    print(markdown(results))


if __name__ == "__main__":
    main()
