"""What ``mst.apply(attention=True)`` costs in one layer's core attention, against what activation checkpointing runs.

    python -m experiments.table6.attention_op                                    # CPU, d = 256, S = 4K and 16K (~2 min)
    python -m experiments.table6.attention_op --device cuda --hidden 4096 --seq-lens 65536 131072

Per step a checkpointed layer runs its attention forward without a graph, again in the recompute, then backward. AC:
that with SDPA (``is_causal``, GQA without repeated K/V). MsT: the same three calls through
``mst.ops.mini_sequence_attention`` (the recompute's forward, then each chunk recomputed for its gradients), with
each backend and the default chunks. Round-robin, median of ``--reps``; Llama3-8B head shapes scaled to ``--hidden``
(fp32 on CPU, bf16 on CUDA). Outputs: results/attention_op_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from mst.configs import load_config, scaled_config
from mst.ops import mini_sequence_attention

from ..cli import positive_int, resolve_device
from ..results import environment, write_results
from .op_width import time_ops

HERE = Path(__file__).resolve().parent
MODEL = "llama3-8b"


def attention_steps(heads: int, kv_heads: int, head_dim: int, seq: int, device: torch.device,
                    dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """One checkpointed layer's attention work per step for SDPA ("ac") and each backend of the op."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, seq, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(1, kv_heads, seq, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(1, kv_heads, seq, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
    gqa = heads != kv_heads

    def step(attend: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                attend()
            attend().sum().backward()
            q.grad = k.grad = v.grad = None
        return run

    return {"ac": step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)),
            "mst_sdpa": step(lambda: mini_sequence_attention(q, k, v, backend="sdpa")),
            "mst_math": step(lambda: mini_sequence_attention(q, k, v, backend="math"))}


def run(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), args.dtype  # set by resolve_device: fp32 on CPU, bf16 on CUDA
    full = load_config(MODEL)
    config = full if args.hidden == full.hidden_size else scaled_config(MODEL, hidden_size=args.hidden)
    shape = dict(heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, head_dim=config.head_dim)
    rows = []
    for seq in args.seq_lens:
        times = time_ops(attention_steps(**shape, seq=seq, device=device, dtype=dtype), args.reps, device)
        rows.append({"seq_len": seq, "seconds": {name: statistics.median(t) for name, t in times.items()},
                     "times_s": times})
    return {"environment": environment(device), "dtype": str(dtype).removeprefix("torch."), "reps": args.reps,
            "hidden": args.hidden, **shape, "rows": rows}


def markdown(results: dict) -> str:
    lines = [f"One layer's core attention per step (forward without graph, recompute, backward; "
             f"{results['environment']['device']}, {results['dtype']}, d = {results['hidden']}: "
             f"{results['heads']} heads of {results['head_dim']}, {results['kv_heads']} KV heads; median of "
             f"{results['reps']} round-robin "
             "rounds), seconds and time / AC's:", "",
             "| seq len | AC (SDPA) s | MsT sdpa s | MsT sdpa / AC | MsT math s | MsT math / AC |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        s = r["seconds"]
        lines.append(f"| {r['seq_len']} | {s['ac']:.3f} | {s['mst_sdpa']:.3f} | {s['mst_sdpa'] / s['ac']:.2f} | "
                     f"{s['mst_math']:.3f} | {s['mst_math'] / s['ac']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--hidden", type=positive_int, default=256, help="model width d (Llama3-8B shape scaled to it)")
    p.add_argument("--seq-lens", type=positive_int, nargs="+", default=[4096, 16384])
    p.add_argument("--reps", type=positive_int, default=5, help="samples per variant (each >= 0.25 s of calls)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    out = resolve_device(args)
    results = run(args)
    text = markdown(results)
    write_results(out / f"attention_op_{args.device}", results, text)
    print(text)


if __name__ == "__main__":
    main()
