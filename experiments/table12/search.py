"""One Table 12 point: the longest sequence that trains within a per-rank memory budget on this job's ranks.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m experiments.table12.search --out /tmp/p.json
    srun python -m experiments.table12.search --device cuda --model llama3-8b ...      # SLURM, NCCL

Every rank builds the same seeded model, applies the strategy (vanilla Ulysses, or MsT + Ulysses), and runs the
world as one sequence-parallel group (``experiments.sequence_parallel.SPStep``). A trial at length S is one full
training step (sharded forward, backward, gradient reduction, AdamW step) measured with
``mst.memory.measure.measure_peak``; one warm-up step first allocates the AdamW state, so it counts. S fits when
the largest per-rank peak is within the budget: the search is ``mst.memory.length_search.search_max_seq_len`` with
``reduce_peak`` = the maximum over ranks (one all-reduce per trial), so every rank takes the same decision and
tries the same next length. It runs on multiples of ``--grain`` tokens per rank and is seeded with the planner's
limit for exactly this setting (``mst.memory.max_seq_len``, the same call as run.py's planner column), so an
accurate prediction costs a few trials near the limit. After the search, one more step at the limit is timed (the
slowest rank's wall seconds). Rank 0 writes the JSON: per strategy the limit, that time, the planner's seed and
every trial (``probes``: length, fits, largest per-rank peak, error).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from tqdm import tqdm

import mst.distributed as md
from mst.configs import load_config, scaled_config
from mst.memory.length_search import StepFactory, Trial, search_max_seq_len
from mst.memory.strategies import prepare

from ..cli import positive_float, positive_int
from ..models import build_model
from ..results import environment, write_json
from ..sequence_parallel import SPStep

MiB = 1024 ** 2
CPU_BUDGET_MIB = 32.0  # scaled model: above the AdamW step's own peak (~27 MiB), so the length decides


def default_budget_mib(device: str) -> float:
    """Per-rank budget when none is given: CPU_BUDGET_MIB on CPU, 95% of the GPU's memory on CUDA."""
    if device == "cpu":
        return CPU_BUDGET_MIB
    return float(round(0.95 * torch.cuda.get_device_properties(0).total_memory / MiB))


def build_config(name: str):
    """'scaled': Llama-3-8B scaled to d=128 (V/d, I/d and 4 query heads per kv head kept), 2 layers, and 16 heads
    of 8 dims so that Ulysses splits query *and* kv heads over 1, 2 and 4 ranks like Llama-3-8B's 32 / 8 heads over
    up to 8 GPUs (the default scaling, 4 heads / 1 kv head, would replicate kv heads on every rank)."""
    if name == "scaled":
        return scaled_config("llama3-8b", 128, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4,
                             head_dim=8)
    return load_config(name)


def random_ids(vocab_size: int, seq_len: int) -> torch.Tensor:
    """(1, seq_len) token ids, the same on every rank (seeded by the length)."""
    return torch.randint(0, vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seq_len))


def planner_limit(config, strategy: str, *, ranks: int, budget_mib: float, grain: int,
                  device: str | torch.device) -> int | None:
    """The planner's max length for exactly the measured setting (the search's seed and run.py's planner column);
    None when it refuses (ValueError: heads not divisible by the ranks, or weights and optimizer state alone over
    the budget)."""
    from mst.memory import max_seq_len

    device = torch.device(device)
    try:
        return int(max_seq_len(config, strategy, sp_size=ranks, gpu_mem_gb=budget_mib / 1024, reserve_gb=0.0,
                               optimizer="adamw", dtype=model_dtype(device), granularity=grain,
                               device=device.type))
    except ValueError as err:
        print(f"[table12] planner: {strategy} x{ranks}: {err}", flush=True)
        return None


def model_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on CUDA (the model's and the planner's)."""
    device = torch.device(device)
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def step_factory(stepper: SPStep) -> StepFactory:
    """``make_step(seq_len)`` of the length search: the same model and optimizer at every length."""
    vocab = stepper.model.config.vocab_size

    def make_step(seq_len: int):  # the ids are made inside the measured step, so the batch's bytes count too
        return (lambda: stepper.step(random_ids(vocab, seq_len))), stepper.track

    return make_step


def search_strategy(strategy: str, config, args, env, budget: int) -> dict:
    """This strategy's largest fitting length on all ranks, its search trials, and one timed step at it."""
    model = prepare(build_model(config, device=env.device, dtype=model_dtype(env.device),
                                attn_implementation="sdpa"), strategy)
    sp = md.setup_sequence_parallel(model, env.world_size)
    stepper = SPStep(model, sp, env.device)
    unit = args.grain * env.world_size  # the global length is split evenly over the ranks
    stepper.step(random_ids(model.config.vocab_size, 16 * unit))  # warm-up: AdamW state exists in every trial
    seed = planner_limit(config, strategy, ranks=env.world_size, budget_mib=args.budget_mib, grain=args.grain,
                         device=env.device)  # None: the search starts by doubling
    with tqdm(desc=f"{strategy} x{env.world_size}", unit="trial", disable=env.rank != 0) as bar:
        def progress(trial: Trial) -> None:
            bar.set_postfix(seq=trial.seq_len, fits=trial.fits)
            bar.update()

        result = search_max_seq_len(step_factory(stepper), budget_bytes=budget, device=env.device,
                                    start=16 * unit, granularity=unit, expect=seed, warmup_steps=0,
                                    method="tracker", progress=progress, reduce_peak=stepper.all_max)
    best = result.max_seq_len
    seconds = stepper.all_max(stepper.timed_step(random_ids(model.config.vocab_size, best)).seconds) if best \
        else None
    md.teardown_sequence_parallel(model)
    return {"max_seq_len": best, "step_seconds_at_max": seconds, "seed": seed, "granularity": unit,
            "peak_bytes_at_max": result.peak_bytes, "breakdown_at_max_rank0": result.breakdown,
            "probes": [vars(t) for t in result.trials]}


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
    if args.budget_mib is None:
        args.budget_mib = default_budget_mib(env.device.type)
    budget = int(args.budget_mib * MiB)
    config = build_config(args.model)
    point = {"environment": environment(env.device), "ranks": env.world_size, "device": env.device.type,
             "backend": env.dist_backend, "model": args.model, "budget_bytes": budget,
             "grain_tokens_per_rank": args.grain,
             "strategies": {s: search_strategy(s, config, args, env, budget) for s in args.strategies}}
    if env.rank == 0:
        write_json(args.out, point)  # replaced whole: a killed run leaves no half JSON for --reuse
        print(json.dumps({s: v["max_seq_len"] for s, v in point["strategies"].items()}), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
