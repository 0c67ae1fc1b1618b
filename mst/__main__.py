"""Command line: ``python -m mst plan`` predicts the longest trainable sequence per strategy, with the peak breakdown.

    python -m mst plan --model llama3-8b --gpu-mem-gb 80 --optimizer adamw_in_backward
    python -m mst plan --model gemma2-9b --sp-size 4 --strategy mst --strategy mst_offload --json
    python -m mst plan --model path/to/config.json --seq-len 32768 --engine traced
    python -m mst plan --model llama3-8b --optimizer adamw_in_backward --engine traced --norms
    python -m mst plan --model llama3-8b --optimizer adamw_in_backward --engine traced --norms --attention
    python -m mst plan --model llama3-8b --engine traced --strategy mst_offload --seq-len 262144 --explain
    python -m mst plan --model llama3-8b --engine traced --norms --attention --strategy mst_offload --model-state host

Each row also estimates the step's time: FLOPs at ``--tflops`` (sustained, default 400) and host traffic at
``--host-gbps`` (default 25), see ``mst.memory.planner.cost``; ``--model-state host`` plans weights, gradients and
Adam states on the host through DeepSpeed ZeRO-3 offload, the host column then includes them.

Bad input (unknown model, a missing or invalid config file, numbers that are not a real card or model such as NaN,
a negative reserve or a zero head count, a model whose weights and optimizer state alone exceed the GPU, invalid
options) prints one line on stderr and exits with status 2, as argparse does. The planner itself validates the
numbers (``mst.memory.planner.Budget``, ``ModelSpec``, ``Workload``); this module only reports its ValueError.
A search that reaches its cap without overflowing prints "at least N (the search cap)" (JSON: ``capped``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import PretrainedConfig

from .memory.planner import (DEFAULT_RESERVE_GB, ENGINES, MODEL_STATES, Budget, Plan, StepCost, max_seq_len, plan,
                             step_cost)
from .memory.planner.cost import DEFAULT_HOST_GBPS, DEFAULT_TFLOPS
from .memory.planner.spec import check_config_sizes
from .memory.strategies import OPTIMIZERS, STRATEGIES

GiB = 1024 ** 3
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COLUMNS = ("weights", "gradients", "optimizer_state", "activations", "transient")
Row = tuple[int, Plan | None, bool, StepCost | None]  # length, its plan (None: nothing fits), capped, its cost


def _load_file(model: str) -> PretrainedConfig:
    """An HF config from a config.json path, with its sizes checked before transformers parses it (whose own
    checks divide by the head count) and any transformers error turned into a ValueError naming the file."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    path = Path(model)
    if not path.is_file():  # else transformers takes the name for a hub repository and reports the network
        raise ValueError(f"config file {model!r} does not exist")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read config {model!r}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"cannot read config {model!r}: expected a JSON object, got {type(raw).__name__}")
    try:
        check_config_sizes(raw)
        return AutoConfig.from_pretrained(str(path))
    except (OSError, TypeError, ValueError, ArithmeticError, StrictDataclassError) as exc:
        raise ValueError(f"config {model!r}: {exc}") from exc


def _load(model: str) -> PretrainedConfig:
    from .configs import MODELS, load_config

    if model.endswith(".json"):
        return _load_file(model)
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)} (or a path to a config.json)")
    return load_config(model)


def _rows(args) -> dict[str, Row]:
    Budget(args.gpu_mem_gb, args.reserve_gb)  # also when --seq-len skips the search: the header prints both
    config = _load(args.model)
    common = dict(sp_size=args.sp_size, gpu_mem_gb=args.gpu_mem_gb, optimizer=args.optimizer, dtype=DTYPES[args.dtype],
                  grad_accumulation=args.grad_accumulation, engine=args.engine, batch_size=args.batch_size,
                  model_state=args.model_state)
    options = {name: True for name in ("norms", "attention") if getattr(args, name)}
    if args.explain and args.engine != "traced":
        raise ValueError("--explain lists the traced engine's tensors: add --engine traced")
    if options and args.engine != "traced":
        raise ValueError(f"--{' --'.join(options)} is modelled by the traced engine only: add --engine traced")
    rows = {}
    for strategy in args.strategy or list(STRATEGIES):
        # vanilla and ac stay as they are: --norms / --attention are options of the mst strategies
        common["mst_options"] = options if options and strategy.startswith("mst") else None
        if args.seq_len is not None:  # plan exactly this length (the planner rejects 0 and negatives)
            length, capped = args.seq_len, False
            p = plan(config, length, strategy, **common)
        else:
            length = max_seq_len(config, strategy, reserve_gb=args.reserve_gb, granularity=args.granularity, **common)
            capped = length.capped
            p = plan(config, length, strategy, **common) if length else None
        rows[strategy] = (length, p, capped, _cost(args, config, strategy, length) if p else None)
    return rows


def _table(args, rows: dict[str, Row]) -> str:
    head = (f"{args.model}: {args.sp_size} x {args.gpu_mem_gb:g} GiB ({args.reserve_gb:g} GiB reserve), {args.dtype}, "
            f"{args.optimizer}{', grad accumulation' if args.grad_accumulation else ''}, batch {args.batch_size}, "
            f"{args.engine} engine{', norms in mini-sequences (mst strategies)' if args.norms else ''}"
            f"{', mini-sequence attention (mst strategies)' if args.attention else ''}"
            f"{', model state on the host (ZeRO-3 offload)' if args.model_state == 'host' else ''}; "
            f"time at {args.tflops:g} TFLOP/s and {args.host_gbps:g} GB/s host link (assumed)")
    label = "seq len" if args.seq_len is not None else "max seq len"
    lines = [head, f"{'strategy':<12} {label:>11} {'peak GiB':>9} " + " ".join(f"{c[:11]:>11}" for c in COLUMNS)
             + f" {'step s':>8}  peak phase (host GiB)"]
    notes = []
    for strategy, (length, p, capped, cost) in rows.items():
        if p is None:
            lines.append(f"{strategy:<12} {length:>11}   (not even {args.granularity * args.sp_size} tokens fit)")
            continue
        cells = " ".join(f"{p.breakdown[c] / GiB:>11.2f}" for c in COLUMNS)
        host = f" ({p.host_bytes / GiB:.1f})" if p.host_bytes else ""
        lines.append(f"{strategy:<12} {length:>11} {p.peak_gib:>9.2f} {cells} {cost.step_s:>8.1f}  {p.phase}{host}")
        if capped:
            notes.append(f"{strategy}: max seq len at least {length} (the search cap); its row plans that length")
    if args.explain:
        notes += _explain(args, rows)
    return "\n".join(lines + notes)


def _cost(args, config: PretrainedConfig, strategy: str, length: int) -> StepCost:
    """The step's FLOPs, host traffic and time at ``length`` tokens (``mst.memory.planner.cost``)."""
    return step_cost(config, length, strategy, sp_size=args.sp_size, batch_size=args.batch_size,
                     dtype=DTYPES[args.dtype], model_state=args.model_state,
                     attention=args.attention and strategy.startswith("mst"), tflops=args.tflops,
                     host_gbps=args.host_gbps)


def _explain(args, rows: dict[str, Row], top: int = 12) -> list[str]:
    """Per strategy whose peak is a layer's backward: the tensors alive at that peak by the op that made them, in
    bytes per token (S marks the token dimension)."""
    lines = []
    for strategy, (length, p, _, _) in rows.items():
        if p is None or not p.peak_tensors:
            continue
        tokens = p.batch_size * length // p.sp_size
        lines += ["", f"{strategy} at {length} tokens, {p.phase}: the layer's tensors at the peak, bytes per token "
                      f"({sum(t['bytes'] for t in p.peak_tensors) / tokens / 1e3:.1f} KB in all)"]
        for t in p.peak_tensors[:top]:
            shape = ", ".join("S" if n == length // p.sp_size else str(n) for n in t["shape"])
            lines.append(f"  {t['bytes'] / tokens / 1e3:9.2f} KB  {t['op']} {t['dtype']} ({shape})")
        rest = sum(t["bytes"] for t in p.peak_tensors[top:])
        if rest:
            lines.append(f"  {rest / tokens / 1e3:9.2f} KB  {len(p.peak_tensors) - top} more")
    return lines


def _json(args, rows: dict[str, Row]) -> str:
    searched = args.seq_len is None
    lengths = {"max_seq_len" if searched else "seq_len": {s: row[0] for s, row in rows.items()}}
    if searched:  # True: the search stopped at its cap, the limit is at least max_seq_len
        lengths["capped"] = {s: row[2] for s, row in rows.items()}
    return json.dumps({"model": args.model, "sp_size": args.sp_size, "gpu_mem_gb": args.gpu_mem_gb,
                       "reserve_gb": args.reserve_gb, "dtype": args.dtype, "optimizer": args.optimizer,
                       "grad_accumulation": args.grad_accumulation, "engine": args.engine,
                       "batch_size": args.batch_size, "norms": args.norms, "attention": args.attention,
                       "model_state": args.model_state, **lengths,
                       "plans": {s: (p.to_dict() if p else None) for s, (_, p, _, _) in rows.items()},
                       "costs": {s: (cost.to_dict() if cost else None) for s, (_, _, _, cost) in rows.items()}},
                      indent=1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mst", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="predict max sequence length and peak memory per strategy")
    p.add_argument("--model", required=True, help="llama3-8b, llama2-7b, mistral-7b, qwen2-7b, gemma2-9b or a "
                                                  "config.json path")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="GPU memory in GiB (default 80)")
    p.add_argument("--reserve-gb", type=float, default=DEFAULT_RESERVE_GB,
                   help=f"GiB kept free for the CUDA context and fragmentation (default {DEFAULT_RESERVE_GB})")
    p.add_argument("--sp-size", type=int, default=1, help="DeepSpeed-Ulysses sequence-parallel size (default 1)")
    p.add_argument("--strategy", action="append", choices=list(STRATEGIES),
                   help="repeat to choose several (default: all)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--grad-accumulation", action="store_true",
                   help="plan a micro-step of a gradient-accumulation window (every gradient resident; no step count)")
    p.add_argument("--engine", choices=ENGINES, default="analytic")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--norms", action="store_true",
                   help="mst strategies with mst.apply(norms=True): hidden-state norms in mini-sequences "
                        "(traced engine)")
    p.add_argument("--attention", action="store_true",
                   help="mst strategies with mst.apply(attention=True): core attention by query chunks, SDPA's "
                        "flash kernel per chunk on a GPU (traced engine)")
    p.add_argument("--explain", action="store_true",
                   help="list the tensors alive at a layer-backward peak, in bytes per token (traced engine; the JSON "
                        "always has them as peak_tensors)")
    p.add_argument("--model-state", choices=MODEL_STATES, default="device",
                   help="where weights, gradients and Adam states live: device (default) or host (DeepSpeed ZeRO-3 "
                        "offload_param + offload_optimizer; needs --optimizer adamw, which then runs on the host)")
    p.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS,
                   help=f"sustained TFLOP/s per GPU for the step-time estimate (default {DEFAULT_TFLOPS:g}, assumed)")
    p.add_argument("--host-gbps", type=float, default=DEFAULT_HOST_GBPS,
                   help=f"host link GB/s per direction for the transfer time (default {DEFAULT_HOST_GBPS:g}, assumed)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None, help="plan this length instead of searching the maximum")
    p.add_argument("--granularity", type=int, default=256, help="search step in tokens (default 256)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        rows = _rows(args)
        text = _json(args, rows) if args.json else _table(args, rows)
    except ValueError as exc:  # the planner's and the loader's verdict on the input
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
