"""Table 6 (MsT paper, Sec. 4.2): training throughput of vanilla, activation checkpointing (AC) and MsT.

    bash experiments/table6/run.sh                      # CPU: scaled models, ratios MsT/AC and MsT/vanilla (~3 min)
    bash experiments/table6/run.sh --device cuda        # full-size Llama3-8B at 8K and Llama2-7B at 4K, bf16

The paper's "TFLOPS" column is tokens per second (batch x seq / time-per-step matches every row; paper.md §1), so
this reports tokens/s and seconds/step. Each group (model, sequence length, batch) builds one model and one
optimizer-in-backward step, and times the strategies **round-robin** (one step of each in turn, the order rotating
every round) after warm-up, so load from other jobs on a shared machine hits every strategy alike; it reports the
median and the interquartile range and records the load average. Strategies are switched on the same model with
``mst.revert`` + ``prepare``; "mst_no_ac" is MsT without activation checkpointing (the paper's Llama2 row).

"Larger batch": at an equal memory budget MsT fits a larger batch than AC. The budget is Table 2's rule
(experiments/table2/README.md: the 80 GB GPU emulated at the scaled size, budget_s = static_s + free_full x k x t x
dtype_factor); the largest batch of each strategy is found with ``mst.memory.length_search`` over the batch size
(RSS-measured steps, seeded by the planner), then the two are timed round-robin. On CUDA the budget is the GPU.
On CPU the search runs first with glibc's mmap threshold at 64 KiB (exact RSS peaks), the timing after it at 32 MiB:
at 64 KiB every tensor is a fresh mapping faulted in on first touch, which more than doubled step times.

CPU mode uses the scaled models of experiments/max_length.py (d = 128, same L, V/d, I/d, GQA) with sequence lengths
scaled by the Table 2 factor t = k = d_s / d (8K -> 256, 4K -> 128 tokens), fp32. Absolute CPU tokens/s are not
comparable with an A100's; the ratios are. It also counts MLP forward passes per step (a hook on each MLP's
activation) and times one MLP forward: MsT with checkpointing runs the MLP forward twice per step, as AC does (the
checkpoint's recompute stops before the MLP, whose per-chunk recompute in backward takes its place;
``mst.ops.mini_sequence_mlp``), where a naive combination runs it three times.
Outputs: results/table6_<device>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from max_length import build_model, static_bytes_full  # noqa: E402  (shared with Tables 2-4)
from common import (add_scaled_model_args, nonnegative_int, positive_int, resolve_device,  # noqa: E402
                    write_results)
from plot import figure, markdown  # noqa: E402

import mst  # noqa: E402
from mst.configs import load_config, scaled_config  # noqa: E402
from mst.memory.length_search import is_allocation_failure, run_trial, search_max_seq_len  # noqa: E402
from mst.memory.measure import free_memory, set_mmap_threshold  # noqa: E402
from mst.memory.planner import DEFAULT_RESERVE_GB, plan  # noqa: E402
from mst.memory.strategies import make_train_step, prepare  # noqa: E402

GiB = 1024 ** 3
OPTIMIZER = "adamw_in_backward"  # the paper keeps optimizer-in-backward from Table 9 on
GPU_MEM_GB = 80.0
VARIANTS = {"vanilla": ("vanilla", {}), "ac": ("ac", {}), "mst": ("mst", {}),
            "mst_no_ac": ("mst", {"checkpointing": False}),
            # attribution (--variants): MsT with one of its two ops left unchunked
            "mst_mlp_unsplit": ("mst", {"mlp_chunks": 1}), "mst_lm_head_unchunked": ("mst", {"lm_head_chunks": 1})}
# (model, full-size sequence length, batch, variants): the paper's rows, plus the equal-batch comparisons
GROUPS = (
    ("llama3-8b", 8192, 1, ("vanilla", "ac", "mst")),
    ("llama3-8b", 8192, 2, ("vanilla", "ac", "mst")),
    ("llama3-8b", 8192, 8, ("mst",)),
    ("llama2-7b", 4096, 1, ("vanilla", "ac", "mst", "mst_no_ac")),
    ("llama2-7b", 4096, 16, ("mst",)),
)
# paper.md §1 Table 6, A100 80G: (tokens/s printed as "TFLOPS", s/step); "OOM"; None = not printed
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


def model_config(name: str, args):
    if args.device == "cuda":
        return load_config(name)
    return scaled_config(name, hidden_size=args.hidden,
                         **({"num_hidden_layers": args.layers} if args.layers is not None else {}))


def scaled_seq(name: str, full_seq: int, args) -> int:
    return full_seq if args.device == "cuda" else max(16, round(full_seq * args.hidden / load_config(name).hidden_size))


def use(model, variant: str):
    strategy, options = VARIANTS[variant]
    return prepare(mst.revert(model), strategy, **options)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(times: list[float], tokens: int) -> dict:
    q1, med, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return {"s_per_step": med, "iqr_s": [q1, q3], "tokens_per_s": tokens / med,
            "tokens_per_s_iqr": [tokens / q3, tokens / q1], "times_s": times}


def time_round_robin(model, step, variants: list[str], seq: int, batch: int, args, bar) -> dict:
    """Warm-up, then ``args.steps`` rounds of one step per variant, the order rotating; running out of memory
    (``is_allocation_failure``: CUDA, cuBLAS or CPU allocator) drops a variant, any other error propagates."""
    device = torch.device(args.device)
    times: dict[str, list[float]] = {v: [] for v in variants}
    cells: dict[str, dict] = {}
    live = list(variants)
    for round_index in range(args.warmup + args.steps):
        order = live[round_index % max(1, len(live)):] + live[:round_index % max(1, len(live))]
        for variant in order:
            use(model, variant)
            try:
                _sync(device)
                start = time.perf_counter()
                step(seq)
                _sync(device)
                elapsed = time.perf_counter() - start
            except Exception as exc:
                if not is_allocation_failure(exc):
                    raise
                live.remove(variant)
                cells[variant] = {"oom": True}
                free_memory()
                continue
            if round_index >= args.warmup:
                times[variant].append(elapsed)
        bar.update(1)
    for variant in variants:
        cells.setdefault(variant, summary(times[variant], batch * seq) if times[variant] else {"oom": True})
    return cells


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
    device = torch.device(args.device)
    mlps = [layer.mlp for layer in mst.revert(model).get_decoder().layers]
    x = torch.randn(batch, seq, model.config.hidden_size, device=device, dtype=args.dtype)
    samples = []
    with torch.no_grad():
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            for mlp in mlps:
                mlp(x)
            _sync(device)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def budget_args(args) -> SimpleNamespace:
    """The arguments experiments/max_length.static_bytes_full reads (Table 2's budget rule)."""
    return SimpleNamespace(gpu_mem_gb=GPU_MEM_GB, optimizer=OPTIMIZER, full_dtype=torch.bfloat16, grad_accumulation=1)


def planner_max_batch(config, seq: int, strategy: str, budget_bytes: int, **kwargs) -> int:
    batch = 0
    while batch < 512 and plan(config, seq, strategy, optimizer=OPTIMIZER, batch_size=batch + 1,
                               **kwargs).peak_bytes <= budget_bytes:
        batch += 1
    return batch


def max_batch(name: str, full_seq: int, variant: str, args) -> dict:
    """Largest batch of ``variant`` at the Table 2 budget (CPU) or on the GPU (CUDA), by search over batch."""
    device = torch.device(args.device)
    config, seq = model_config(name, args), scaled_seq(name, full_seq, args)
    strategy = VARIANTS[variant][0]
    full = load_config(name)
    planner_full = planner_max_batch(full, full_seq, strategy, int((GPU_MEM_GB - DEFAULT_RESERVE_GB) * GiB))

    def make_step(batch: int, length: int = seq):
        model = use(build_model(config, device, args.dtype, None), variant)
        step, track = make_train_step(model, optimizer=OPTIMIZER, batch_size=batch)
        return (lambda: step(length)), track

    budget, planner_small = None, planner_full
    if device.type == "cpu":
        k = config.hidden_size / full.hidden_size
        static, _ = run_trial(lambda b: make_step(b, 16), 1, None, device, method="rss")
        free_full = (GPU_MEM_GB - DEFAULT_RESERVE_GB) * GiB - static_bytes_full(full, strategy, budget_args(args))
        dtype_factor = torch.finfo(args.dtype).bits / 16
        budget = int(static.peak_bytes + free_full * k * k * dtype_factor)
        planner_small = planner_max_batch(config, seq, strategy, budget, dtype=args.dtype, device="cpu")
    found = search_max_seq_len(make_step, budget_bytes=budget, device=device, start=max(1, planner_small // 2),
                               granularity=1, max_len=512, method="rss" if device.type == "cpu" else "tracker")
    return {"variant": variant, "seq_len": seq, "max_batch": found.max_seq_len, "budget_bytes": budget,
            "planner_same_setting": planner_small, "planner_full": planner_full,
            "trials": [vars(t) for t in found.trials]}


def time_larger_batch(larger: dict, args, bar) -> None:
    """Time each variant at its own max batch. CPU: one model each, stepped alternately (the load hits both
    alike). CUDA: two 8B models do not fit, so one after the other, each with its own model."""
    device = torch.device(args.device)
    seq = scaled_seq("llama3-8b", 8192, args)

    def build(variant: str):
        model = use(build_model(model_config("llama3-8b", args), device, args.dtype, None), variant)
        return make_train_step(model, optimizer=OPTIMIZER, batch_size=max(1, larger[variant]["max_batch"]))[0]

    def timed(step) -> float:
        _sync(device)
        start = time.perf_counter()
        step(seq)
        _sync(device)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {v: [] for v in larger}
    if device.type == "cpu":
        steps = {v: build(v) for v in larger}
        for round_index in range(args.warmup + args.steps):
            for variant in (list(larger) if round_index % 2 == 0 else list(larger)[::-1]):
                elapsed = timed(steps[variant])
                if round_index >= args.warmup:
                    times[variant].append(elapsed)
            bar.update(1)
        del steps
    else:
        for variant in larger:
            step = build(variant)
            times[variant] = [timed(step) for _ in range(args.warmup + args.steps)][args.warmup:]
            del step
            free_memory()
        bar.update(args.warmup + args.steps)
    for variant, found in larger.items():
        found.update(summary(times[variant], max(1, found["max_batch"]) * seq))
    free_memory()


def run(args) -> dict:
    device = torch.device(args.device)
    load_start = os.getloadavg()
    groups = [g for g in GROUPS if args.groups is None or group_key(g) in args.groups]
    rounds = (args.warmup + args.steps) * (len(groups) + args.larger_batch)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
               "dtype": str(args.dtype).replace("torch.", ""), "optimizer": OPTIMIZER, "warmup": args.warmup,
               "steps": args.steps, "hidden": None if device.type == "cuda" else args.hidden,
               "paper": PAPER, "paper_ratios": PAPER_RATIOS, "targets": TARGETS,
               "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                            "mst": mst.__version__, "python": platform.python_version()},
               "date": time.strftime("%Y-%m-%d %H:%M"), "groups": [], "mlp_extra_forward": {}}
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
            model = build_model(model_config(name, args), device, args.dtype, None)
            step, _ = make_train_step(model, optimizer=OPTIMIZER, batch_size=batch)
            group = {"model": name, "full_seq": full_seq, "seq_len": seq, "batch": batch,
                     "load_before": os.getloadavg(),
                     "cells": time_round_robin(model, step, list(variants), seq, batch, args, bar)}
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
                     ("mst_mlp_unsplit", "ac"), ("mst_lm_head_unchunked", "ac")):
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
    args = p.parse_args(argv)
    out = resolve_device(args)
    results = run(args)
    stem = out / f"table6_{args.device}"
    write_results(stem, results, markdown(results))
    figure(results, stem.with_suffix(".png"))
    print(markdown(results))


if __name__ == "__main__":
    main()
