"""What fills the GPU at the peak, tensor by tensor, before and after the whole-layer options (traced planner).

    python -m experiments.planner.explain          # Llama3-8B, checkpoints offloaded, 256K tokens, 80 GB (~1 min)

At a length where every variant's peak is the top layer's backward, the traced engine lists the layer's tensors alive
at that peak (``python -m mst plan --explain``), in bytes per token, for MsT, MsT + norms in mini-sequences, and
MsT + norms + mini-sequence attention. Outputs: results/explain.{json,md}.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mst.configs import load_config
from mst.memory.planner import plan

from ..cli import positive_int
from ..results import environment, write_results

HERE = Path(__file__).resolve().parent
VARIANTS = {"mst": {}, "mst + norms": {"norms": True}, "mst + norms + attention": {"norms": True, "attention": True}}
TOP = 10


def run(args: argparse.Namespace) -> dict:
    config = load_config(args.model)
    rows = {}
    for name, options in VARIANTS.items():
        p = plan(config, args.seq_len, args.strategy, optimizer="adamw_in_backward", engine="traced",
                 mst_options=options or None)
        rows[name] = {"phase": p.phase, "peak_bytes": p.peak_bytes, "peak_tensors": p.peak_tensors}
    return {"environment": environment(torch.device("cpu")), "model": args.model, "strategy": args.strategy,
            "seq_len": args.seq_len, "gpu_mem_gb": 80.0, "optimizer": "adamw_in_backward", "dtype": "bfloat16",
            "variants": rows}


def _shape(shape: list[int], seq: int) -> str:
    return "(" + ", ".join("S" if n == seq else str(n) for n in shape) + ")"


def markdown(results: dict) -> str:
    seq = results["seq_len"]
    lines = [f"{results['model']}, {results['strategy']}, {seq:,} tokens, bf16, optimizer-in-backward (traced "
             f"planner, full size): the top layer's tensors alive at its backward peak, KB per token (1 KB = 1000 "
             f"bytes; S = the token dimension; op = the operator that made the tensor), the {TOP} largest", ""]
    for name, row in results["variants"].items():
        tensors = row["peak_tensors"]
        total = sum(t["bytes"] for t in tensors) / seq / 1e3
        lines += [f"**{name}**: peak {row['peak_bytes'] / 2 ** 30:.1f} GiB at {row['phase']}; the layer's tensors "
                  f"{total:.1f} KB per token", "", "| KB/token | op | dtype | shape |", "|---:|---|---|---|"]
        lines += [f"| {t['bytes'] / seq / 1e3:.2f} | {t['op']} | {t['dtype']} | {_shape(t['shape'], seq)} |"
                  for t in tensors[:TOP]]
        rest = sum(t["bytes"] for t in tensors[TOP:]) / seq / 1e3
        lines += [f"| {rest:.2f} | {len(tensors) - TOP} more | | |" if len(tensors) > TOP else "", ""]
    return "\n".join(line for line in lines if line is not None) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--strategy", default="mst_offload", choices=["mst", "mst_offload"])
    p.add_argument("--seq-len", type=positive_int, default=262144)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run(args)
    text = markdown(results)
    write_results(out / "explain", results, text)
    print(text)


if __name__ == "__main__":
    main()
