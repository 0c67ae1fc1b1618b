"""Table 6 (MsT paper, Sec. 4.2): training throughput of vanilla, activation checkpointing (AC) and MsT.

    bash experiments/table6/run.sh                      # CPU: scaled models, ratios MsT/AC and MsT/vanilla (~3 min)
    bash experiments/table6/run.sh --device cuda        # full-size Llama3-8B at 8K and Llama2-7B at 4K, bf16

The paper's "TFLOPS" column is tokens per second (batch x seq / time-per-step matches every row; docs/paper.md §1), so
this reports tokens/s and seconds/step. Each group (model, sequence length, batch) builds one model and one
optimizer-in-backward step, and times the strategies **round-robin** (one step of each in turn, the order rotating
every round, ``experiments.timing``) after warm-up, so load from other jobs on a shared machine hits every strategy alike; it reports the
median and the interquartile range and records the load average. Strategies are switched on the same model with
``mst.revert`` + ``prepare``; "mst_no_ac" is MsT without activation checkpointing (the paper's Llama2 row).

"Larger batch": at an equal memory budget MsT fits a larger batch than AC. The budget is Table 2's rule
(experiments/table2/README.md: the 80 GB GPU emulated at the scaled size, budget_s = static_s + free_full x k x t x
dtype_factor); the largest batch of each strategy is found with ``experiments.search.search_batch`` (RSS-measured steps, seeded by
the planner), then the two are timed round-robin. On CUDA the budget is the GPU.
On CPU the search runs first with glibc's mmap threshold at 64 KiB (exact RSS peaks), the timing after it at 32 MiB:
at 64 KiB every tensor is a fresh mapping faulted in on first touch, which more than doubled step times.

CPU mode uses the scaled models of ``experiments.models.model_config`` (d = 128, same L, V/d, I/d, GQA) with sequence lengths
scaled by the Table 2 factor t = k = d_s / d (8K -> 256, 4K -> 128 tokens), fp32. Absolute CPU tokens/s are not
comparable with an A100's; the ratios are. It also counts MLP forward passes per step (a hook on each MLP's
activation) and times one MLP forward: MsT with checkpointing runs the MLP forward twice per step, as AC does (the
checkpoint's recompute stops before the MLP, whose per-chunk recompute in backward takes its place;
``mst.ops.mini_sequence_mlp``), where a naive combination runs it three times.
Outputs: results/table6_<device>.{json,md}, paper_figures/table6_throughput[_cuda].png.
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

import mst
from mst.configs import load_config
from mst.memory.length_search import run_trial
from mst.memory.measure import free_memory, set_mmap_threshold
from mst.memory.planner import DEFAULT_RESERVE_GB, plan
from mst.memory.strategies import make_train_step, prepare

from ..budget import GiB, emulated_free_bytes
from ..cli import add_scaled_model_args, nonnegative_int, positive_int, resolve_device
from ..models import build_model, model_config
from ..results import environment, figure_path, write_results
from ..search import search_batch
from ..timing import round_robin, seconds, throughput
from .plot import figure, markdown

HERE = Path(__file__).resolve().parent
OPTIMIZER = "adamw_in_backward"  # the paper keeps optimizer-in-backward from Table 9 on
GPU_MEM_GB = 80.0
VARIANTS = {"vanilla": ("vanilla", {}), "ac": ("ac", {}), "mst": ("mst", {}),
            "mst_no_ac": ("mst", {"checkpointing": False}),
            # attribution (--variants): MsT with one of its two ops left unchunked
            "mst_mlp_unsplit": ("mst", {"mlp_chunks": 1}), "mst_lm_head_unchunked": ("mst", {"lm_head_chunks": 1}),
            # the cost of mst.apply(norms=True): hidden-state norms in mini-sequences too (--variants mst mst_norms)
            "mst_norms": ("mst", {"norms": True}),
            # the cost of mst.apply(attention=True): the core attention by query chunks (--variants mst mst_attention)
            "mst_attention": ("mst", {"attention": True}),
            "mst_norms_attention": ("mst", {"norms": True, "attention": True})}
# (model, full-size sequence length, batch, variants): the paper's rows, plus the equal-batch comparisons
GROUPS = (
    ("llama3-8b", 8192, 1, ("vanilla", "ac", "mst")),
    ("llama3-8b", 8192, 2, ("vanilla", "ac", "mst")),
    ("llama3-8b", 8192, 8, ("mst",)),
    ("llama2-7b", 4096, 1, ("vanilla", "ac", "mst", "mst_no_ac")),
    ("llama2-7b", 4096, 16, ("mst",)),
)
# docs/paper.md §1 Table 6, A100 80G: (tokens/s printed as "TFLOPS", s/step); "OOM"; None = not printed
PAPER = {
    "llama3-8b/8192/1/vanilla": "OOM",
    "llama3-8b/8192/2/ac": (3271.42, 5.01), "llama3-8b/8192/2/mst": (3194.90, 5.13),
    "llama3-8b/8192/8/mst": (3386.13, 19.35),
    "llama2-7b/4096/1/vanilla": (3290.88, 1.24), "llama2-7b/4096/1/ac": (2684.67, None),
    "llama2-7b/4096/1/mst_no_ac": (3115.03, 1.31), "llama2-7b/4096/16/mst": (3656.17, 17.92),
}
PAPER_RATIOS = {"mst/ac equal batch (llama3-8b, b=2)": 3194.90 / 3271.42,
                "mst b=8 / ac b=2 (llama3-8b, larger batch)": 3386.13 / 3271.42,
                "mst_no_ac/vanilla (llama2-7b, b=1)": 3115.03 / 3290.88}
TARGETS = {"mst/ac equal batch": 0.98, "mst/ac larger batch": 1.0}


def config_of(name: str, args):
    return model_config(name, args.device, args.hidden, args.layers)


def build(name: str, args):
    return build_model(config_of(name, args), device=args.device, dtype=args.dtype)


def scaled_seq(name: str, full_seq: int, args) -> int:
    """The group's length at the run's scale (full size on CUDA, S x d_run / d_full on CPU), or ``--seq-len``."""
    if args.seq_len is not None:
        return args.seq_len
    return full_seq if args.device == "cuda" else max(16, round(full_seq * args.hidden / load_config(name).hidden_size))


def use(model, variant: str):
    strategy, options = VARIANTS[variant]
    return prepare(mst.revert(model), strategy, **options)


def time_variants(model, step, variants: list[str], seq: int, batch: int, args, bar) -> dict:
    """Warm-up, then ``args.steps`` round-robin rounds of one step per variant (``experiments.timing``), the model
    switched to each variant untimed; a variant that runs out of memory is a cell ``{"oom": True}``."""
    times = round_robin({v: (lambda: step(seq)) for v in variants}, rounds=args.steps, warmup=args.warmup,
                        device=args.device, before=lambda v: use(model, v), on_round=lambda: bar.update(1))
    return {v: throughput(t, batch * seq) if t else {"oom": True} for v, t in times.items()}


def mlp_forward_passes(model, step, variants: list[str], seq: int, batch: int) -> dict:
    """Tokens through an MLP forward per step, in units of batch x seq x layers (vanilla 1, AC 2, MsT+AC 2),
    counted by a hook on every layer's MLP activation."""
    counted = {"tokens": 0}
    layers = model.get_decoder().layers

    def hook(module, inputs, output):
        counted["tokens"] += output.numel() // output.shape[-1]

    handles = [layer.mlp.act_fn.register_forward_hook(hook) for layer in layers]
    passes = {}
    try:
        for variant in variants:
            use(model, variant)
            counted["tokens"] = 0
            step(seq)
            passes[variant] = counted["tokens"] / (batch * seq * len(layers))
    finally:
        for handle in handles:
            handle.remove()
    return passes


def mlp_forward_seconds(model, seq: int, batch: int, args, repeats: int = 10) -> float:
    """One forward of every layer's MLP over batch x seq tokens (no grad): the price of one extra pass."""
    mlps = [layer.mlp for layer in mst.revert(model).get_decoder().layers]
    x = torch.randn(batch, seq, model.config.hidden_size, device=args.device, dtype=args.dtype)

    def forward() -> None:
        for mlp in mlps:
            mlp(x)

    with torch.no_grad():
        return statistics.median(seconds(forward, args.device) for _ in range(repeats))


def planner_max_batch(config, seq: int, strategy: str, budget_bytes: int, **kwargs) -> int:
    batch = 0
    while batch < 512 and plan(config, seq, strategy, optimizer=OPTIMIZER, batch_size=batch + 1,
                               **kwargs).peak_bytes <= budget_bytes:
        batch += 1
    return batch


def max_batch(name: str, full_seq: int, variant: str, args) -> dict:
    """Largest batch of ``variant`` at the Table 2 budget (CPU) or on the GPU (CUDA), by search over batch."""
    device = torch.device(args.device)
    config, seq = config_of(name, args), scaled_seq(name, full_seq, args)
    strategy = VARIANTS[variant][0]
    full = load_config(name)
    planner_full = planner_max_batch(full, full_seq, strategy, int((GPU_MEM_GB - DEFAULT_RESERVE_GB) * GiB))

    def make_step(batch: int, length: int = seq):
        model = use(build(name, args), variant)
        step, track = make_train_step(model, optimizer=OPTIMIZER, batch_size=batch)
        return (lambda: step(length)), track

    budget, planner_small = None, planner_full
    if device.type == "cpu":
        k = config.hidden_size / full.hidden_size
        static, _ = run_trial(lambda b: make_step(b, 16), 1, None, device, method="rss")
        # Table 2's rule with t = k: the sequence is scaled by k, the batch searched
        budget = int(static.peak_bytes + emulated_free_bytes(full, strategy, scale=k * k, dtype=args.dtype,
                                                              gpu_mem_gb=GPU_MEM_GB, optimizer=OPTIMIZER))
        planner_small = planner_max_batch(config, seq, strategy, budget, dtype=args.dtype, device="cpu")
    found = search_batch(make_step, device=device, budget_bytes=budget, expect=planner_small)
    return {"variant": variant, "seq_len": seq, "max_batch": found.max_seq_len, "budget_bytes": budget,
            "planner_same_setting": planner_small, "planner_full": planner_full,
            "trials": [vars(t) for t in found.trials]}


def time_larger_batch(larger: dict, args, bar) -> None:
    """Time each variant at its own max batch. CPU: one model each, timed round-robin (the load hits both alike).
    CUDA: two 8B models do not fit, so one after the other, each with its own model."""
    seq = scaled_seq("llama3-8b", 8192, args)

    def build_step(variant: str):
        model = use(build("llama3-8b", args), variant)
        step = make_train_step(model, optimizer=OPTIMIZER, batch_size=max(1, larger[variant]["max_batch"]))[0]
        return lambda: step(seq)

    if args.device == "cpu":
        times = round_robin({v: build_step(v) for v in larger}, rounds=args.steps, warmup=args.warmup,
                            device=args.device, on_round=lambda: bar.update(1))
    else:
        times = {}
        for variant in larger:
            times.update(round_robin({variant: build_step(variant)}, rounds=args.steps, warmup=args.warmup,
                                     device=args.device))
            free_memory()
        bar.update(args.warmup + args.steps)
    for variant, found in larger.items():
        found.update(throughput(times[variant], max(1, found["max_batch"]) * seq) if times[variant] else {"oom": True})
    free_memory()


def run(args) -> dict:
    device = torch.device(args.device)
    load_start = os.getloadavg()
    groups = [g for g in GROUPS if args.groups is None or group_key(g) in args.groups]
    rounds = (args.warmup + args.steps) * (len(groups) + args.larger_batch)
    results = {"environment": environment(device), "dtype": str(args.dtype).replace("torch.", ""), "optimizer": OPTIMIZER,
               "warmup": args.warmup, "steps": args.steps, "hidden": None if device.type == "cuda" else args.hidden,
               "paper": PAPER, "paper_ratios": PAPER_RATIOS, "targets": TARGETS, "groups": [],
               "mlp_extra_forward": {}}
    with tqdm(total=rounds, desc="table6", unit="round") as bar:
        # first the batch search, which measures RSS peaks: freed tensors must leave at once (a fresh heap)
        timed_threshold = 32 << 20  # then timing: freed tensors stay in glibc's heap (no page faults per step)
        if set_mmap_threshold(65536):
            results["glibc_mmap_threshold"] = {"batch_search": 65536, "timing": timed_threshold}
        bar.set_postfix_str("larger batch: searching max batch of ac and mst")
        larger = {v: max_batch("llama3-8b", 8192, v, args) for v in ("ac", "mst")} if args.larger_batch else {}
        set_mmap_threshold(timed_threshold)
        for name, full_seq, batch, variants in groups:
            variants = args.variants or variants
            seq = scaled_seq(name, full_seq, args)
            bar.set_postfix_str(f"{name} S={seq} b={batch}")
            model = build(name, args)
            step, _ = make_train_step(model, optimizer=OPTIMIZER, batch_size=batch)
            group = {"model": name, "full_seq": full_seq, "seq_len": seq, "batch": batch,
                     "load_before": os.getloadavg(),
                     "cells": time_variants(model, step, list(variants), seq, batch, args, bar)}
            group["load_after"] = os.getloadavg()
            if name == "llama3-8b" and batch == 1:  # the MLP's extra forward, measured once
                results["mlp_extra_forward"] = {
                    "model": name, "seq_len": seq, "batch": batch,
                    "passes_per_step": mlp_forward_passes(model, step, list(variants), seq, batch),
                    "one_pass_s": mlp_forward_seconds(model, seq, batch, args)}
            results["groups"].append(group)
            del model, step
            free_memory()
        if larger:
            bar.set_postfix_str("larger batch: timing ac and mst at their max batch")
            time_larger_batch(larger, args, bar)
        results["larger_batch"] = larger
    results["load_average"] = {"start": load_start, "end": os.getloadavg()}
    results["ratios"] = ratios(results)
    return results


def group_key(group: tuple) -> str:
    """"model/full_seq/batch", the name ``--groups`` selects a group by."""
    return "/".join(str(part) for part in group[:3])


def ratios(results: dict) -> dict:
    """Tokens/s ratios at equal batch per group, and MsT at its max batch over AC at its max batch."""
    out = {}
    for g in results["groups"]:
        cells = g["cells"]
        for a, b in (("mst", "ac"), ("mst", "vanilla"), ("mst_no_ac", "vanilla"), ("mst_no_ac", "ac"),
                     ("mst_mlp_unsplit", "ac"), ("mst_lm_head_unchunked", "ac"), ("mst_norms", "mst"),
                     ("mst_attention", "mst"), ("mst_norms_attention", "mst")):
            if "tokens_per_s" in cells.get(a, {}) and "tokens_per_s" in cells.get(b, {}):
                out[f"{a}/{b} {g['model']} b={g['batch']}"] = cells[a]["tokens_per_s"] / cells[b]["tokens_per_s"]
    lb = results["larger_batch"]
    if lb:
        out[f"mst b={lb['mst']['max_batch']} / ac b={lb['ac']['max_batch']} llama3-8b (equal memory)"] = (
            lb["mst"]["tokens_per_s"] / lb["ac"]["tokens_per_s"])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scaled_model_args(p, HERE / "results")
    p.add_argument("--steps", type=positive_int, default=6, help="measured rounds (one step of every strategy each)")
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="rounds run before timing")
    p.add_argument("--no-larger-batch", dest="larger_batch", action="store_false",
                   help="skip the max-batch search and its timing (equal-batch groups only)")
    p.add_argument("--groups", nargs="+", choices=[group_key(g) for g in GROUPS], default=None,
                   help="time only these groups (default: all)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                   help="time these strategies in every selected group instead of the group's own")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="time every selected group at this length instead of its scaled paper length (e.g. long "
                        "enough that every chunked op splits: --variants mst mst_norms --seq-len 4096)")
    args = p.parse_args(argv)
    out = resolve_device(args)
    results = run(args)
    stem = out / f"table6_{args.device}"
    write_results(stem, results, markdown(results))
    figure(results, figure_path("table6_throughput", args.device, args.figures))
    print(markdown(results))


if __name__ == "__main__":
    main()
