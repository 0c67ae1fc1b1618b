"""Command line: ``python -m mst plan`` predicts the longest trainable sequence per strategy, with the peak breakdown.

    python -m mst plan --model llama3-8b --gpu-mem-gb 80 --optimizer adamw_in_backward
    python -m mst plan --model gemma2-9b --gpus 4 --strategy mst --strategy mst_offload --json
    python -m mst plan --model path/to/config.json --seq-len 32768 --engine traced

Bad input (unknown model, a model whose weights and optimizer state alone exceed the GPU, invalid options) prints
one line on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .memory.planner import DEFAULT_RESERVE_GB, ENGINES, Plan, max_seq_len, plan
from .memory.strategies import OPTIMIZERS, STRATEGIES

GiB = 1024 ** 3
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COLUMNS = ("weights", "gradients", "optimizer_state", "activations", "transient")


class _Fail(Exception):
    """A user error: reported on stderr with exit status 2."""


def _load(model: str):
    from .configs import MODELS, load_config

    if model.endswith(".json"):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as exc:
            raise _Fail(f"cannot read config {model!r}: {exc}") from exc
    if model not in MODELS:
        raise _Fail(f"unknown model {model!r}; known: {', '.join(MODELS)} (or a path to a config.json)")
    return load_config(model)


def _rows(args) -> dict[str, tuple[int, Plan | None]]:
    config = _load(args.model)
    common = dict(gpus=args.gpus, gpu_mem_gb=args.gpu_mem_gb, optimizer=args.optimizer, dtype=DTYPES[args.dtype],
                  grad_accumulation=args.grad_accumulation, engine=args.engine, batch_size=args.batch_size)
    rows = {}
    for strategy in args.strategy or list(STRATEGIES):
        try:
            if args.seq_len:
                length = args.seq_len
            else:
                length = max_seq_len(config, strategy, reserve_gb=args.reserve_gb, granularity=args.granularity,
                                     **common)
            rows[strategy] = (length, plan(config, length, strategy, **common) if length else None)
        except ValueError as exc:
            raise _Fail(str(exc)) from exc
    return rows


def _table(args, rows: dict[str, tuple[int, Plan | None]]) -> str:
    head = (f"{args.model}: {args.gpus} x {args.gpu_mem_gb:g} GiB ({args.reserve_gb:g} GiB reserve), {args.dtype}, "
            f"{args.optimizer}{', grad accumulation' if args.grad_accumulation else ''}, batch {args.batch_size}, "
            f"{args.engine} engine")
    label = "seq len" if args.seq_len else "max seq len"
    lines = [head, f"{'strategy':<12} {label:>11} {'peak GiB':>9} " + " ".join(f"{c[:11]:>11}" for c in COLUMNS)
             + "  peak phase (host GiB)"]
    for strategy, (length, p) in rows.items():
        if p is None:
            lines.append(f"{strategy:<12} {length:>11}   (not even {args.granularity * args.gpus} tokens fit)")
            continue
        cells = " ".join(f"{p.breakdown[c] / GiB:>11.2f}" for c in COLUMNS)
        host = f" ({p.host_bytes / GiB:.1f})" if p.host_bytes else ""
        lines.append(f"{strategy:<12} {length:>11} {p.peak_gib:>9.2f} {cells}  {p.phase}{host}")
    return "\n".join(lines)


def _json(args, rows: dict[str, tuple[int, Plan | None]]) -> str:
    return json.dumps({"model": args.model, "gpus": args.gpus, "gpu_mem_gb": args.gpu_mem_gb,
                       "reserve_gb": args.reserve_gb, "dtype": args.dtype, "optimizer": args.optimizer,
                       "grad_accumulation": args.grad_accumulation, "engine": args.engine,
                       "batch_size": args.batch_size,
                       "max_seq_len" if not args.seq_len else "seq_len": {s: n for s, (n, _) in rows.items()},
                       "plans": {s: (p.to_dict() if p else None) for s, (_, p) in rows.items()}}, indent=1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mst", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="predict max sequence length and peak memory per strategy")
    p.add_argument("--model", required=True, help="llama3-8b, llama2-7b, mistral-7b, qwen2-7b, gemma2-9b or a "
                                                  "config.json path")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="GPU memory in GiB (default 80)")
    p.add_argument("--reserve-gb", type=float, default=DEFAULT_RESERVE_GB,
                   help=f"GiB kept free for the CUDA context and fragmentation (default {DEFAULT_RESERVE_GB})")
    p.add_argument("--gpus", type=int, default=1, help="DeepSpeed-Ulysses sequence-parallel size (default 1)")
    p.add_argument("--strategy", action="append", choices=list(STRATEGIES),
                   help="repeat to choose several (default: all)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--grad-accumulation", action="store_true", help="gradients resident (long accumulation)")
    p.add_argument("--engine", choices=ENGINES, default="analytic")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None, help="plan this length instead of searching the maximum")
    p.add_argument("--granularity", type=int, default=256, help="search step in tokens (default 256)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.gpus <= 0 or args.batch_size <= 0 or args.gpu_mem_gb <= 0:
            raise _Fail("--gpus, --batch-size and --gpu-mem-gb must be positive")
        rows = _rows(args)
    except _Fail as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_json(args, rows) if args.json else _table(args, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
