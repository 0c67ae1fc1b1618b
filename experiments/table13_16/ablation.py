"""Tables 13-16 (MsT paper, Sec. 5.2 / App. F): time and peak memory of the LM-head and of the MLP against the
sequence length S and the number of mini-sequences M, and the measurement behind the default chunk sizes.

    bash experiments/table13_16/run.sh                  # CPU: scaled-op measurement + full-size planner (~13 min)
    bash experiments/table13_16/run.sh --device cuda    # full Llama3-8B shapes, every cell measured on the GPU

One op at a time, forward + backward, Llama3-8B shapes (d=4096, I=14336, V=128256), batch 1:
* LM-head: "standard" = what vanilla HF does (bf16 ``lm_head`` logits, HF's ``ForCausalLMLoss`` with its fp32 upcast;
  the logits are dropped before backward, as the Trainer does); M = ``chunked_lm_head_loss(num_chunks=M)``.
* MLP: "standard" = HF's ``LlamaMLP``; "naive" = the official plain chunk loop (``mode="naive"``, saves every
  chunk's intermediates); "recompute" = exact MsT (saves only its input), both with M mini-sequences.
Peak = bytes of every live tensor: weights, inputs (and the upstream gradient) plus what the op allocates.

Where the numbers come from (every cell says which):
* "planner": the op traced at full size on fake tensors with the traced planner's ``LiveBytes`` (the same byte
  accounting as ``MemTracker``, nothing allocated), bf16.
* "measured": real runs on this device. On CPU the ops are scaled by 1/k in d, I, V *and* S (default k=32), which
  scales every memory term (S x V, S x I, S x d, V x d, I x d) by exactly 1/k^2, so measured x k^2 is the full-size
  equivalent; memory is measured in bf16 with ``measure_peak`` (MemTracker). CPU times are fp32 (bf16 matmuls take an
  emulated path ~25x slower here: it would hide the chunking overhead and cost the whole time budget) and are
  not GPU times.
* "anchor": the paper's S=1024 time anchors at the real full shapes (CPU fp32), beside the paper's GPU ratios.
* ``chunk_default``: MLP and LM-head chunk sizes {d, 2d=8K, 16K, 32K} tokens (and the LM-head's M=ceil(V/d) rule):
  full-size op peaks (planner), the whole-model max sequence length (``mst.memory.max_seq_len``, traced engine,
  the option passed through ``mst_options``), and measured op times at long S (scaled by 1/16 on CPU).
Outputs: results/table13_16_<device>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.models.llama.modeling_llama import LlamaMLP

from mst.configs import load_config, scaled_config
from mst.memory import max_seq_len, plan
from mst.memory.length_search import is_allocation_failure
from mst.memory.live_bytes import LiveBytes
from mst.memory.measure import free_memory, measure_peak
from mst.ops import chunked_lm_head_loss, default_mlp_chunk_tokens, mini_sequence_mlp, resolve_chunk_tokens

from ..cli import add_figures_arg, nonnegative_int, positive_float, positive_int, require_device
from ..results import environment, figure_path, write_results
from ..timing import seconds
from .plot import chunk_figure, figure, markdown

HERE = Path(__file__).resolve().parent
MODEL = "llama3-8b"
SEQ_LENS = (1024, 2048, 4096, 8192, 20000, 40000, 80000)
CHUNKS = (2, 4, 8, 16, 32)
CHUNK_TOKENS = (4096, 8192, 16384, 32768)  # d, 2d (= 8K for Llama3), 16K, 32K
CHUNK_SEQ_LENS = (32768, 65536, 131072)  # long S for the chunk-size comparison (full-size tokens)
PAPER = {  # docs/paper.md §1, Tables 13-16 (only these cells are printed)
    "lm_head_time_s": {"1024": {"standard": 0.01, "32": 0.11}},
    "lm_head_memory_gb": {"80000": {"standard": 59.92, "16": 9.12, "32": "89.8% reduction (~6.1)"}},
    "mlp_time_s": {"1024": {"standard": 0.05, "8": 0.12}},
    "mlp_memory_gb": {"80000": {"standard": 14.72, "8": 11.66}},
}
LM_HEAD_TARGET_GB = 1.5  # issue 6: LM-head peak at S=80K for Llama3 shapes
TARGET_CHUNK_TOKENS = (2048, 1024, 256)  # extra LM-head chunks (tokens) for the target analysis
TARGET_BLOCK_ROWS = 8192  # vocabulary rows per block of the blocked weight gradient in the target analysis


@dataclass
class Case:
    """One op ready to run: ``step()`` does forward + backward; ``static`` lists the tensors alive before it."""

    step: Callable[[], None]
    static: list[torch.Tensor]
    grads: Callable[[], list[torch.Tensor | None]]  # the gradients the step returns (read after it ran)


def lm_head_case(head: nn.Linear, seq: int, *, chunks: int | None = None, chunk_tokens: int | None = None,
                 weight_grad_block_rows: int | None = None) -> Case:
    """LM-head + loss over ``seq`` tokens: HF's path when neither ``chunks`` nor ``chunk_tokens`` is given."""
    vocab, d = head.weight.shape
    device, dtype = head.weight.device, head.weight.dtype
    hidden = torch.randn(1, seq, d, device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, seq), device=device)
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]  # what HF's loss shifts internally
    standard = chunks is None and chunk_tokens is None

    def step() -> None:
        hidden.grad = head.weight.grad = None
        if standard:  # the bf16 logits live through the loss forward (HF returns them), not through backward
            loss = ForCausalLMLoss(head(hidden), labels, vocab_size=vocab)
        else:
            loss = chunked_lm_head_loss(hidden, head.weight, shifted, num_chunks=chunks, chunk_tokens=chunk_tokens,
                                        weight_grad_block_rows=weight_grad_block_rows)
        loss.backward()

    return Case(step, [head.weight, hidden, labels, shifted], lambda: [head.weight.grad, hidden.grad])


def mlp_case(mlp: LlamaMLP, seq: int, *, mode: str = "standard", chunks: int | None = None,
             chunk_tokens: int | None = None) -> Case:
    """HF ``LlamaMLP`` over ``seq`` tokens: unchunked, or through ``mini_sequence_mlp`` ("naive" / "recompute")."""
    params = list(mlp.parameters())
    x = torch.randn(1, seq, mlp.hidden_size, device=params[0].device, dtype=params[0].dtype).requires_grad_()
    grad_out = torch.randn_like(x)
    chunk = None if mode == "standard" else resolve_chunk_tokens(seq, chunk_tokens, chunks)

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        y = mlp(x) if chunk is None else mini_sequence_mlp(x, mlp, params, chunk, mode=mode)
        y.backward(grad_out)

    return Case(step, [*params, x, grad_out], lambda: [*(p.grad for p in params), x.grad])


def empty_module(op: str, config, dtype: torch.dtype) -> nn.Module:
    """The op's weights on meta. Built outside ``FakeTensorMode``: ``Module.to`` cannot swap fake parameters."""
    with torch.device("meta"):
        module = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if op == "lm_head" else LlamaMLP(config)
    return module.to(dtype)


def build(op: str, config, seq: int, dtype: torch.dtype, device: str, setting: dict,
          module: nn.Module | None = None) -> Case:
    """The op with random weights on ``device`` (``module``: an ``empty_module`` made earlier)."""
    module = (module or empty_module(op, config, dtype)).to_empty(device=device)
    for p in module.parameters():
        nn.init.normal_(p, std=config.initializer_range)
    return (lm_head_case if op == "lm_head" else mlp_case)(module, seq, **setting)


def traced_peak(op: str, config, seq: int, setting: dict, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Planner: peak bytes of the op at any size, traced on fake tensors (``LiveBytes``, nothing allocated)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = empty_module(op, config, dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        case = build(op, config, seq, dtype, "cpu", setting, module)
        tracker = LiveBytes(case.static)
        with tracker:
            case.step()
        mark = tracker.mark()
        static = sum(t.untyped_storage().nbytes() for t in case.static)
        grads = tracker.bytes_of(mark.peak_storages, case.grads())
    return {"peak_bytes": static + mark.peak, "static_bytes": static, "grads_at_peak_bytes": grads,
            "intermediate_bytes": mark.peak - grads}


def time_case(case: Case, reps: int, warmup: int, device: str) -> list[float]:
    """Seconds of forward + backward, ``reps`` times after ``warmup`` untimed runs."""
    for _ in range(warmup):
        case.step()
    return [seconds(case.step, device) for _ in range(reps)]


def measure_case(op: str, config, seq: int, setting: dict, args, *, memory: bool = True) -> dict:
    """Measured cell: peak (``measure_peak``, in ``args.mem_dtype``) and time (``args.time_dtype``); running out of
    memory (``is_allocation_failure``: CUDA, cuBLAS or CPU allocator) is a result, any other error propagates."""
    out: dict = {}
    try:
        if memory:
            case = build(op, config, seq, args.mem_dtype, args.device, setting)
            report = measure_peak(case.step, case.static, args.device)
            out.update(peak_bytes=report.peak_bytes, breakdown=report.breakdown,
                       allocator_peak_bytes=report.allocator_peak_bytes)
            del case
            free_memory()
        case = build(op, config, seq, args.time_dtype, args.device, setting)
        times = time_case(case, args.reps, args.warmup, args.device)
        out.update(time_s=statistics.median(times), times_s=times)
    except Exception as exc:
        if not is_allocation_failure(exc):
            raise
        out["oom"] = True
    free_memory()
    return out


def op_settings(op: str, chunks: tuple[int, ...]) -> list[tuple[str, dict]]:
    """(label, case kwargs) of every row of Table 13/14 (LM-head) or 15/16 (MLP)."""
    if op == "lm_head":
        return [("standard", {})] + [(str(m), {"chunks": m}) for m in chunks]
    return [("standard", {})] + [(f"{mode} {m}", {"mode": mode, "chunks": m})
                                 for mode in ("naive", "recompute") for m in chunks]


def ablation(args, full, scaled, bar: tqdm) -> dict:
    """Tables 13-16: every (op, setting, S) cell, planner at full size and measured (scaled on CPU)."""
    rows = []
    for op in ("lm_head", "mlp"):
        for label, setting in op_settings(op, args.chunks):
            for seq in args.seq_lens:
                bar.set_description(f"{op} {label} S={seq}")
                row = {"op": op, "setting": label, "seq_len": seq,
                       "planner": traced_peak(op, full, seq, setting)}
                small = max(1, round(seq / args.scale))
                if args.scale > 1:
                    row["planner_scaled"] = traced_peak(op, scaled, small, setting)
                row["measured"] = {"seq_len": small, **measure_case(op, scaled, small, setting, args)}
                rows.append(row)
                bar.update()
    return {"rows": rows}


def anchors(args, full, bar: tqdm) -> list[dict]:
    """The paper's S=1024 time anchors (LM-head M=32 vs standard, MLP M=8 vs standard) at the real shapes."""
    cells = [("lm_head", "standard", {}), ("lm_head", "32", {"chunks": 32}), ("mlp", "standard", {}),
             ("mlp", "naive 8", {"mode": "naive", "chunks": 8}),
             ("mlp", "recompute 8", {"mode": "recompute", "chunks": 8})]
    out = []
    for op, label, setting in cells:
        bar.set_description(f"anchor {op} {label}")
        case = build(op, full, 1024, args.time_dtype, args.device, setting)
        time_case(build(op, full, 64, args.time_dtype, args.device, setting), 0, 1, args.device)  # cheap warm-up
        times = time_case(case, args.anchor_reps, 0, args.device)
        del case
        free_memory()
        out.append({"op": op, "setting": label, "seq_len": 1024, "time_s": statistics.median(times), "times_s": times})
        bar.update()
    return out


def chunk_default(args, full, bar: tqdm) -> dict:
    """Item 4: chunk sizes in tokens against the paper's rule (MLP C = d, LM-head M = ceil(V/d)); the measurement
    behind the library defaults (``mst.ops.default_mlp_chunk_tokens``, ``lm_head_chunk_tokens``).
    Times only (memory is the planner's): at 1/``args.chunk_scale`` on CPU, larger than the tables' scale so
    that a chunk is a sizeable matmul, as at full size."""
    d, vocab = full.hidden_size, full.vocab_size
    scale = args.chunk_scale
    scaled = scaled_config(MODEL, d // scale) if scale > 1 else full
    head_default = math.ceil(vocab / d)
    settings = {"mlp": [(str(c), {"mode": "recompute", "chunk_tokens": c}) for c in args.chunk_tokens],
                "lm_head": [(f"M={head_default}", {"chunks": head_default})]
                           + [(str(c), {"chunk_tokens": c}) for c in args.chunk_tokens]}
    ops = []
    for op, cells in settings.items():
        for label, setting in cells:
            for seq in args.chunk_seq_lens:
                bar.set_description(f"chunk {op} {label} S={seq}")
                small = max(1, round(seq / scale))
                scaled_setting = {k: (max(1, round(v / scale)) if k == "chunk_tokens" else v)
                                  for k, v in setting.items()}
                ops.append({"op": op, "setting": label, "seq_len": seq,
                            "planner": traced_peak(op, full, seq, setting),
                            "measured": {"seq_len": small, "chunk_tokens": scaled_setting.get("chunk_tokens"),
                                         **measure_case(op, scaled, small, scaled_setting, args, memory=False)}})
                bar.update()
    models = []
    for strategy, label, opts in whole_model_options(args.chunk_tokens, d, vocab) if args.max_len else []:
        bar.set_description(f"max_seq_len {strategy} {label}")
        kwargs = dict(optimizer="adamw_in_backward", engine="traced", mst_options=opts)
        at = plan(MODEL, args.plan_seq_len, strategy, **kwargs)
        models.append({"strategy": strategy, "option": label, "mst_options": opts, "granularity": args.granularity,
                       "max_seq_len": max_seq_len(MODEL, strategy, gpu_mem_gb=args.gpu_mem_gb,
                                                  granularity=args.granularity, **kwargs),
                       "peak_bytes_at": at.peak_bytes, "phase_at": at.phase})
        bar.update()
    return {"mlp_paper_tokens": d, "mlp_default_tokens": default_mlp_chunk_tokens(d),
            "lm_head_default_chunks": head_default, "ops": ops, "max_len": models,
            "scale": scale, "measured_shapes": {"d": scaled.hidden_size, "I": scaled.intermediate_size,
                                                "V": scaled.vocab_size},
            "plan_seq_len": args.plan_seq_len, "gpu_mem_gb": args.gpu_mem_gb,
            "optimizer": "adamw_in_backward", "engine": "traced"}


def whole_model_options(chunk_tokens: tuple[int, ...], d: int, vocab: int) -> list[tuple[str, str, dict]]:
    """(strategy, label, ``mst.apply`` options) for the whole-model max length: the paper's rule, the library
    defaults, each MLP and LM-head chunk size alone (plus the target's small LM-head chunks) under MsT, and the
    candidates under MsT + checkpoint offload, where sequences are ~2.5x longer and the M = ceil(V/d) LM-head chunk
    grows with them."""
    paper = ("paper rule C=d, M=ceil(V/d)", {"mlp_chunk_tokens": d, "lm_head_chunks": math.ceil(vocab / d)})
    mlp = [(f"mlp_chunk_tokens={c}", {"mlp_chunk_tokens": c}) for c in chunk_tokens if c != d]
    head = [(f"lm_head_chunk_tokens={c}", {"lm_head_chunk_tokens": c})
            for c in sorted({*TARGET_CHUNK_TOKENS[:2], *chunk_tokens})]
    candidates = ({"mlp_chunk_tokens": 4 * d}, {"lm_head_chunk_tokens": TARGET_CHUNK_TOKENS[1]},
                  {"lm_head_chunk_tokens": d})
    offload = [paper, ("default", {})] + [o for o in mlp + head if o[1] in candidates]
    return ([("mst", *paper), ("mst", "default", {})] + [("mst", *o) for o in mlp + head]
            + [("mst_offload", *o) for o in offload])


def lm_head_target(table: dict, full, scaled, args, bar: tqdm) -> dict:
    """Issue 6's LM-head target (peak at the longest S <= 1.5 GB): every chunked row there, smaller token chunks,
    and the weight gradient made by vocabulary blocks (``weight_grad_block_rows``, no V x d fp32 accumulator).
    Each peak is split into what the op is handed and hands back (weights, input, labels; the returned dh and dW)
    and its working memory: the fp32 dW accumulator (default) and the logits transients that chunking bounds.
    The added rows are also measured at the scaled size (memory, and time against the same chunk's default)."""
    longest = max(r["seq_len"] for r in table["rows"])
    cells = {f"M={r['setting']}": r["planner"] for r in table["rows"]
             if r["op"] == "lm_head" and r["seq_len"] == longest and r["setting"] != "standard"}
    extra = {f"C={c}": {"chunk_tokens": c} for c in TARGET_CHUNK_TOKENS}
    extra.update({f"{name}, dW by {TARGET_BLOCK_ROWS}-row blocks": {**setting,
                                                                   "weight_grad_block_rows": TARGET_BLOCK_ROWS}
                  for name, setting in (("M=32", {"chunks": 32}), ("C=1024", {"chunk_tokens": 1024}),
                                        ("C=512", {"chunk_tokens": 512}))})
    measured = {}
    for name, setting in extra.items():
        bar.set_description(f"lm_head target {name}")
        cells[name] = traced_peak("lm_head", full, longest, setting)
        if "weight_grad_block_rows" in setting or name == "C=1024":
            small, seq = ({k: v if k == "chunks" else max(1, v // args.scale) for k, v in setting.items()},
                          max(1, round(longest / args.scale)))
            measured[name] = {"setting": small, "seq_len": seq, **measure_case("lm_head", scaled, seq, small, args),
                              "planner_scaled": traced_peak("lm_head", scaled, seq, small)}
        bar.update()
    accumulator = full.vocab_size * full.hidden_size * 4
    blocked = {name for name, setting in extra.items() if "weight_grad_block_rows" in setting}
    rows = []
    for name, cell in cells.items():
        acc = 0 if name in blocked else accumulator
        rows.append({"setting": name, **cell, "fp32_accumulator_bytes": acc,
                     "logits_transient_bytes": cell["intermediate_bytes"] - acc,
                     **({"measured": measured[name]} if name in measured else {})})
    best_total = min(rows, key=lambda r: r["peak_bytes"])
    best_working = min(rows, key=lambda r: r["intermediate_bytes"])
    limit = LM_HEAD_TARGET_GB * 1e9
    floor = full.vocab_size * full.hidden_size * 2 * 2 + longest * full.hidden_size * 2 * 2  # W, dW; h, dh (bf16)
    return {"seq_len": longest, "target_gb": LM_HEAD_TARGET_GB, "rows": rows, "scale": args.scale,
            "best_setting": best_total["setting"], "met": best_total["peak_bytes"] <= limit,
            "floor_bytes": floor, "best_working_setting": best_working["setting"],
            "working_met": best_working["intermediate_bytes"] <= limit}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--scale", type=positive_int, default=None,
                        help="k: measured ops use d/k, I/k, V/k and S/k (default 32 on CPU, 1 on CUDA)")
    parser.add_argument("--chunk-scale", type=positive_int, default=None,
                        help="the same for the chunk-size timings (default 16 on CPU, 1 on CUDA)")
    parser.add_argument("--seq-lens", type=positive_int, nargs="+", default=list(SEQ_LENS), help="full-size S")
    parser.add_argument("--chunks", type=positive_int, nargs="+", default=list(CHUNKS), help="M values")
    parser.add_argument("--reps", type=positive_int, default=3, help="timed repetitions per cell (median reported)")
    parser.add_argument("--warmup", type=nonnegative_int, default=1)
    parser.add_argument("--anchor-reps", type=nonnegative_int, default=1,
                        help="timed runs of the full-shape S=1024 anchors (0 skips them; CPU fp32: ~2 min per rep)")
    parser.add_argument("--chunk-tokens", type=positive_int, nargs="+", default=list(CHUNK_TOKENS))
    parser.add_argument("--chunk-seq-lens", type=positive_int, nargs="+", default=list(CHUNK_SEQ_LENS))
    parser.add_argument("--no-max-len", dest="max_len", action="store_false",
                        help="skip the whole-model max_seq_len per chunk option (~20 s each)")
    parser.add_argument("--plan-seq-len", type=positive_int, default=81920, help="S of the whole-model peak per option")
    parser.add_argument("--gpu-mem-gb", type=positive_float, default=80.0)
    parser.add_argument("--granularity", type=positive_int, default=1024)
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    add_figures_arg(parser)
    args = parser.parse_args(argv)
    if args.scale is None:
        args.scale = 32 if args.device == "cpu" else 1
    if args.chunk_scale is None:
        args.chunk_scale = 16 if args.device == "cpu" else 1
    args.mem_dtype = torch.bfloat16
    args.time_dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    return args


def run(args: argparse.Namespace) -> dict:
    """Everything, as the results JSON (also written to ``args.out_dir``)."""
    require_device(args.device)
    torch.manual_seed(0)
    full = load_config(MODEL)
    scaled = scaled_config(MODEL, full.hidden_size // args.scale) if args.scale > 1 else full
    n_ablation = sum(len(op_settings(op, args.chunks)) for op in ("lm_head", "mlp")) * len(args.seq_lens)
    n_chunk = (2 * len(args.chunk_tokens) + 1) * len(args.chunk_seq_lens) + args.max_len * len(
        whole_model_options(args.chunk_tokens, full.hidden_size, full.vocab_size))
    start = time.time()
    n_target = len(TARGET_CHUNK_TOKENS) + 3
    with tqdm(total=n_ablation + 5 * bool(args.anchor_reps) + n_chunk + n_target, unit="cell") as bar:
        table = ablation(args, full, scaled, bar)
        table["anchors"] = anchors(args, full, bar) if args.anchor_reps else []
        table["chunk_default"] = chunk_default(args, full, bar)
        table["lm_head_target"] = lm_head_target(table, full, scaled, args, bar)
    results = {
        "environment": environment(args.device), "tables": "13-16", "paper": PAPER, **table,
        "meta": {"device": args.device, "seconds": round(time.time() - start, 1), "model": MODEL,
                 "full_shapes": {"d": full.hidden_size, "I": full.intermediate_size, "V": full.vocab_size},
                 "scale": args.scale,
                 "measured_shapes": {"d": scaled.hidden_size, "I": scaled.intermediate_size, "V": scaled.vocab_size},
                 "mem_dtype": str(args.mem_dtype).removeprefix("torch."),
                 "time_dtype": str(args.time_dtype).removeprefix("torch."), "planner_dtype": "bfloat16",
                 "reps": args.reps, "warmup": args.warmup, "anchor_reps": args.anchor_reps,
                 "threads": torch.get_num_threads(), "batch_size": 1}}
    out = Path(args.out_dir) / f"table13_16_{args.device}"
    write_results(out, results, markdown(results))  # each file replaced atomically
    figure(results, figure_path("table13_16_ablation", args.device, args.figures))
    chunk_figure(results, figure_path("table13_16_chunk_default", args.device, args.figures))
    return results


def main() -> None:
    args = parse_args()
    results = run(args)
    print(markdown(results))
    print(f"[table13_16] done in {results['meta']['seconds']:.0f} s; wrote {args.out_dir}", flush=True)


if __name__ == "__main__":
    main()
