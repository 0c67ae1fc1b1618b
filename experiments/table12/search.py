"""One Table 12 point: the longest sequence that trains within a per-rank memory budget on this job's ranks.

    torchrun --standalone --nproc_per_node 2 experiments/table12/search.py --out /tmp/point.json   # CPU, gloo
    srun python experiments/table12/search.py --device cuda --model llama3-8b ...                 # SLURM, NCCL

Every rank builds the same seeded model, applies the strategy (vanilla Ulysses, or MsT + Ulysses), and runs the
world as one sequence-parallel group. A probe at length S is one full training step (sharded forward, backward,
gradient reduction, AdamW step) measured with ``mst.memory.measure.measure_peak``; S fits when the largest
per-rank peak is within the budget. A warm-up step allocates the AdamW state first, so it counts.
Search (``largest_fitting``): extrapolate the nearly affine peak(S) to the budget, then interpolate / bisect on a
grid of ``--grain`` tokens per rank until two neighbouring grid points straddle the budget. Rank 0 writes JSON.
(Not ``mst.memory.length_search``: here every fit decision must be agreed by all ranks, one all-reduce per probe,
and the extrapolation needs ~5 probes where doubling + bisection needs ~12, each a sharded step on shared cores.)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import mst.distributed as md
from mst.configs import load_config, scaled_config
from mst.memory.measure import measure_peak
from mst.memory.strategies import prepare

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: shared helpers
from common import atomic_output, positive_float, positive_int  # noqa: E402

MiB = 1024 ** 2
CPU_BUDGET_MIB = 32.0  # scaled model: above the AdamW step's own peak (~27 MiB), so the length decides


def default_budget_mib(device: str) -> float:
    """Per-rank budget when none is given: CPU_BUDGET_MIB on CPU, 95% of the GPU's memory on CUDA."""
    if device == "cpu":
        return CPU_BUDGET_MIB
    return float(round(0.95 * torch.cuda.get_device_properties(0).total_memory / MiB))


def accelerator_name(device: torch.device) -> str:
    """GPU name, or the CPU model and core count (for the results header)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def build_config(name: str):
    """'scaled': Llama-3-8B scaled to d=128 (V/d, I/d and 4 query heads per kv head kept), 2 layers, and 16 heads
    of 8 dims so that Ulysses splits query *and* kv heads over 1, 2 and 4 ranks like Llama-3-8B's 32 / 8 heads over
    up to 8 GPUs (the default scaling, 4 heads / 1 kv head, would replicate kv heads on every rank)."""
    if name == "scaled":
        return scaled_config("llama3-8b", 128, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4,
                             head_dim=8)
    return load_config(name)


def build_model(name: str, strategy: str, device: torch.device) -> torch.nn.Module:
    """Seeded random-init model (fp32 on CPU, bf16 on CUDA) with ``strategy`` applied; nothing downloaded."""
    torch.manual_seed(0)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(build_config(name), attn_implementation="sdpa", dtype=dtype)
    return prepare(model, strategy)


class Prober:
    """Runs and measures training steps at given lengths; every rank makes the same calls in the same order.

    A step's peak is max(peak of forward + backward + gradient reduction, peak of the AdamW step): the optimizer
    step sees the same tensors (weights, gradients, states) at every length, so it is measured once, and each
    length only needs the sharded forward/backward measured.
    """

    def __init__(self, model, sp, device, budget_bytes: int) -> None:
        self.model, self.sp, self.device, self.budget = model, sp, device, budget_bytes
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
        self.probes: list[dict] = []
        self.backward(128 * sp.size)  # warm-up step: allocates the AdamW state, then measure the step itself
        self.opt_step_peak = self._worst(measure_peak(self.opt.step, track=[model, self.opt], device=device))
        self.opt.zero_grad(set_to_none=True)

    def backward(self, seq: int) -> None:
        ids = torch.randint(0, self.model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq))
        shard = md.shard_batch({"input_ids": ids, "labels": ids}, self.sp.rank, self.sp.size)
        loss = md.sp_loss(self.model, {k: v.to(self.device) for k, v in shard.items()}, self.sp)
        loss.backward()
        md.reduce_gradients(self.model, self.sp)

    def step(self, seq: int) -> None:
        self.backward(seq)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def _worst(self, report) -> int:
        """Largest per-rank peak of a measurement (all ranks call this together)."""
        worst = torch.tensor([report.allocator_peak_bytes or report.peak_bytes], dtype=torch.int64)
        if dist.is_initialized():
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return int(worst)

    def peak(self, seq: int) -> int:
        """Largest per-rank peak of forward + backward + reduction at ``seq`` tokens; the probe is recorded."""
        report = measure_peak(lambda: self.backward(seq), track=[self.model, self.opt], device=self.device)
        self.opt.zero_grad(set_to_none=True)
        worst = self._worst(report)
        step_peak = max(worst, self.opt_step_peak)
        self.probes.append({"seq_len": seq, "peak_bytes_max_rank": step_peak, "backward_peak_bytes_max_rank": worst,
                            "fits": step_peak <= self.budget, "breakdown_rank0": report.breakdown})
        return worst


def largest_fitting(peak_of, budget: int, k0: int = 16, max_growth: int = 8) -> int:
    """Largest k >= 0 with peak_of(k) <= budget, for a nondecreasing, nearly affine peak_of (0: none fits).

    Extrapolates upward through the last two probes (growth capped at ``max_growth`` x) until a probe fails,
    then interpolates inside the bracket (regula falsi, clamped to make progress) and bisects after 3 tries.
    """
    seen: dict[int, int] = {0: 0}
    lo, hi, k = 0, None, k0
    while hi is None:
        seen[k] = peak_of(k)
        if seen[k] > budget:
            hi = k
            break
        lo = k
        prev = max(j for j in seen if j < k)
        slope = (seen[k] - seen[prev]) / (k - prev) if prev else 0.0
        target = k + (budget - seen[k]) / slope if slope > 0 else k * max_growth
        k = int(min(max(target, k + 1), k * max_growth))
    tries = 0
    while hi - lo > 1:
        if tries < 3 and lo in seen and seen[lo] > 0:
            k = lo + int((budget - seen[lo]) / (seen[hi] - seen[lo]) * (hi - lo))
        else:
            k = (lo + hi) // 2
        k = min(max(k, lo + 1), hi - 1)
        tries += 1
        seen[k] = peak_of(k)
        lo, hi = (k, hi) if seen[k] <= budget else (lo, k)
    return lo


def search(prober: Prober, grain: int, ranks: int, bar: tqdm) -> int:
    """Longest multiple of ``grain * ranks`` tokens whose training step fits the budget on every rank."""
    unit = grain * ranks
    if prober.opt_step_peak > prober.budget:
        return 0

    def peak_of(k: int) -> int:  # the step fits iff this <= budget, since the optimizer step alone does
        bar.set_postfix(seq=k * unit)
        peak = prober.peak(k * unit)
        bar.update()
        return peak

    return largest_fitting(peak_of, prober.budget) * unit


def timed_step(prober: Prober, seq: int, device: torch.device) -> float:
    """Wall-clock seconds of one untracked training step at ``seq`` (after the search, so warm)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    prober.step(seq)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--model", default="scaled", help="'scaled' (CPU) or an mst.configs name, e.g. llama3-8b")
    parser.add_argument("--strategies", nargs="+", default=["vanilla", "mst"], choices=["vanilla", "mst"])
    parser.add_argument("--budget-mib", type=positive_float, default=None, help="per-rank budget (default_budget_mib)")
    parser.add_argument("--grain", type=positive_int, default=8, help="search grid, tokens per rank")
    parser.add_argument("--out", required=True, help="JSON written by rank 0")
    args = parser.parse_args(argv)

    env = md.init_distributed(device=args.device)
    budget_mib = args.budget_mib if args.budget_mib is not None else default_budget_mib(env.device.type)
    budget = int(budget_mib * MiB)
    point = {"ranks": env.world_size, "device": env.device.type, "backend": env.backend, "model": args.model,
             "budget_bytes": budget, "grain_tokens_per_rank": args.grain, "strategies": {},
             "torch": torch.__version__, "host": platform.node(),
             "accelerator": accelerator_name(env.device)}
    for strategy in args.strategies:
        model = build_model(args.model, strategy, env.device)
        sp = md.setup_sequence_parallel(model, env.world_size)
        prober = Prober(model, sp, env.device, budget)
        with tqdm(desc=f"{strategy} x{env.world_size}", unit="probe", disable=env.rank != 0) as bar:
            best = search(prober, args.grain, env.world_size, bar)
        seconds = timed_step(prober, best, env.device) if best else math.nan
        point["strategies"][strategy] = {"max_seq_len": best, "step_seconds_at_max": seconds,
                                         "optimizer_step_peak_bytes": prober.opt_step_peak, "probes": prober.probes}
        md.teardown_sequence_parallel(model)
        del model, prober
    if env.rank == 0:
        with atomic_output(args.out) as tmp:  # replaced whole: a killed run leaves no half JSON for --reuse
            tmp.write_text(json.dumps(point, indent=1))
        print(json.dumps({s: v["max_seq_len"] for s, v in point["strategies"].items()}), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
