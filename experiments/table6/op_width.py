"""How Table 6's CPU shortfall depends on model width: MsT's two chunked ops against what AC runs, at growing d.

    bash experiments/table6/run.sh --op-width                                # d = 128 ... 1024, ~2.5 min on 2 CPU cores
    bash experiments/table6/run.sh --op-width --device cuda --widths 4096    # the full-size ops, bf16

Table 6's CPU run emulates Llama3-8B at 8K, batch 2 with d = 128 and 4d tokens (the sequence scaled with d, so the
number of mini-sequences is the full size's: 2 MLP chunks of C = 2d tokens, 16 LM-head chunks of d/4 tokens). Each
chunk is then a small GEMM. This times the two ops alone at the same scaling for several widths d (I and V scaled
with d, Llama3-8B ratios), forward + backward, fp32 on CPU (bf16 on CUDA):

* MLP: AC's work for one layer's MLP (a forward without graph, the checkpoint's recompute, the backward) against
  ``mini_sequence_mlp`` (a forward in 2 chunks, then a per-chunk recompute + backward);
* LM head + loss: HF's (logits, ``ForCausalLMLoss``) against ``chunked_lm_head_loss`` with its default chunks.

Round-robin, median of ``--reps`` after a warm-up. If the ratios approach 1 as d grows, what the scaled-model step
loses is per-chunk overhead and small-GEMM efficiency, not work. Outputs: results/op_width_<device>.{json,md} and
paper_figures/table6_op_width[_cuda].png.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.models.llama.modeling_llama import LlamaMLP

from mst.configs import load_config, scaled_config
from mst.ops import chunked_lm_head_loss, default_mlp_chunk_tokens, lm_head_chunk_tokens, mini_sequence_mlp

from ..cli import add_figures_arg, positive_int, resolve_device
from ..results import environment, figure_path, save_figure, write_results
from ..timing import round_robin, seconds

HERE = Path(__file__).resolve().parent
MODEL, FULL_SEQ, BATCH = "llama3-8b", 8192, 2  # Table 6's group where both ops are chunked


def mlp_steps(config, tokens: int, device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    mlp = LlamaMLP(config).to(device, dtype)
    params = list(mlp.parameters())
    x0 = torch.randn(tokens, config.hidden_size, device=device, dtype=dtype)
    grad = torch.randn_like(x0)
    chunk = default_mlp_chunk_tokens(config.hidden_size)

    def ac() -> None:
        x = x0.detach().requires_grad_()
        with torch.no_grad():  # the checkpointed forward keeps nothing
            mlp(x)
        mlp(x).backward(grad)  # the recompute in backward, then the backward

    def mst() -> None:
        x = x0.detach().requires_grad_()
        mini_sequence_mlp(x, mlp.forward, params, chunk).backward(grad)

    return {"ac": ac, "mst": mst}


def lm_head_steps(config, tokens: int, device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    weight = (torch.randn(config.vocab_size, config.hidden_size, device=device) * 0.02).to(dtype).requires_grad_()
    hidden = torch.randn(1, tokens, config.hidden_size, device=device, dtype=dtype)
    labels = torch.randint(0, config.vocab_size, (1, tokens), device=device)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]

    def ac() -> None:
        h = hidden.detach().requires_grad_()
        ForCausalLMLoss(h @ weight.t(), labels, vocab_size=config.vocab_size).backward()

    def mst() -> None:
        h = hidden.detach().requires_grad_()
        chunked_lm_head_loss(h, weight, shifted).backward()

    return {"ac": ac, "mst": mst}


def time_ops(steps: dict[str, Callable[[], None]], reps: int, device: torch.device,
             min_seconds: float = 0.25) -> dict[str, list[float]]:
    """Seconds per call of each step: ``reps`` round-robin rounds after a warm-up call of each, a small op called
    repeatedly within a round (at least ``min_seconds`` per sample) so timer and noise stay small."""
    calls = {name: max(1, int(min_seconds / seconds(step, device))) for name, step in steps.items()}
    return round_robin(steps, rounds=reps, warmup=0, device=device, calls=calls)


def markdown(results: dict) -> str:
    lines = [f"MsT's chunked ops against AC's at Table 6's Llama3-8B 8K batch-2 scaling ({results['environment']['device']}, "
             f"{results['dtype']}, {results['reps']} rounds); median seconds, and MsT / AC time: median over the rounds "
             f"(lowest-highest)", "",
             "| d | tokens | MLP chunks | MLP AC s | MLP MsT s | MLP MsT/AC | LM-head chunks | LM-head AC s | "
             "LM-head MsT s | LM-head MsT/AC |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        mlp, head = r["mlp"], r["lm_head"]
        lines.append(f"| {r['d']} | {r['tokens']} | {r['mlp_chunks']} | {mlp['ac']:.4f} | {mlp['mst']:.4f} | "
                     f"{_ratio(mlp)} | {r['lm_head_chunks']} | {head['ac']:.4f} | {head['mst']:.4f} | {_ratio(head)} |")
    return "\n".join(lines) + "\n"


def _per_round_ratios(cell: dict) -> list[float]:
    """MsT / AC time of each round (each round times both)."""
    return [m / a for m, a in zip(cell["times_s"]["mst"], cell["times_s"]["ac"])]


def _ratio(cell: dict) -> str:
    """Median MsT / AC of the rounds, with the lowest and highest round."""
    per_round = sorted(_per_round_ratios(cell))
    return f"{statistics.median(per_round):.3f} ({per_round[0]:.2f}-{per_round[-1]:.2f})"


def figure(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    widths = [r["d"] for r in results["rows"]]
    for op, label in (("mlp", "MLP (2 chunks)"), ("lm_head", "LM head + loss (default chunks)")):
        rounds = [_per_round_ratios(r[op]) for r in results["rows"]]
        line, = ax.plot(widths, [statistics.median(x) for x in rounds], "o-", label=label)
        ax.fill_between(widths, [min(x) for x in rounds], [max(x) for x in rounds], color=line.get_color(), alpha=0.2)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="hidden size d (I, V and tokens scaled with d)", ylabel="MsT time / AC time",
           title=f"Chunked ops vs AC's, {results['environment']['device']} {results['dtype']}")
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.legend()
    save_figure(fig, path)  # tight layout, 120 dpi, replaced atomically, closed


def run(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), args.dtype  # fp32 on CPU (bf16 matmuls are emulated), bf16 on CUDA
    torch.manual_seed(0)
    full = load_config(MODEL)
    rows = []
    for d in tqdm(args.widths, desc="widths"):
        config = full if d == full.hidden_size else scaled_config(MODEL, hidden_size=d)
        tokens = BATCH * round(FULL_SEQ * d / full.hidden_size)
        row = {"d": d, "I": config.intermediate_size, "V": config.vocab_size, "tokens": tokens,
               "mlp_chunks": -(-tokens // default_mlp_chunk_tokens(d))}
        for op, make in (("mlp", mlp_steps), ("lm_head", lm_head_steps)):
            times = time_ops(make(config, tokens, device, dtype), args.reps, device)
            row[op] = {name: statistics.median(t) for name, t in times.items()}
            row[op]["times_s"] = times
        row["lm_head_chunks"] = -(-tokens // lm_head_chunk_tokens(tokens, config.vocab_size, d))
        rows.append(row)
    return {"environment": environment(device), "dtype": str(dtype).removeprefix("torch."), "reps": args.reps, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--widths", type=positive_int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--reps", type=positive_int, default=7, help="samples per op (each >= 0.25 s of calls)")
    p.add_argument("--out", default=str(HERE / "results"))
    add_figures_arg(p)
    args = p.parse_args(argv)
    out = resolve_device(args)
    results = run(args)
    stem = out / f"op_width_{args.device}"
    text = markdown(results)
    write_results(stem, results, text)
    figure(results, figure_path("table6_op_width", args.device, args.figures))
    print(text)


if __name__ == "__main__":
    main()
