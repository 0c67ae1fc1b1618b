"""TRL's fused LM head against mst's chunked LM head + loss: peak memory and step time of one training step.

    python -m experiments.clients.trl_head                        # CPU, Llama3-8B shape at d = 256, 4K tokens (~2 min)
    python -m experiments.clients.trl_head --device cuda --hidden 4096 --seq-len 16384

TRL 1.16's SFTTrainer installs its own fused LM head on the model (``trl.trainer.utils.add_fused_lm_head``):
``model(..., fused_lm_head=True)`` returns per-token log-probs (and entropy, top-1 flags) without S x V logits, and
the trainer makes the loss from them. With ``mst.apply`` on the same model, that call runs TRL's head on top of mst's
layers; a call without it runs mst's chunked loss (README "In the clients you train with"). Both are timed here on
one model (2 layers, mst's MLP mini-sequences and checkpointing in both), same batch, round-robin, and their peaks
measured (MemTracker on CPU, the CUDA allocator on a GPU); the losses are checked equal first. Outputs:
results/trl_head_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from trl.trainer.utils import add_fused_lm_head

import mst
from mst.configs import load_config, scaled_config
from mst.memory import measure_peak

from ..cli import positive_int, resolve_device
from ..models import build_model
from ..results import environment, write_results
from ..timing import round_robin

HERE = Path(__file__).resolve().parent
MODEL = "llama3-8b"
TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks its fused head for


def trl_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SFT's token-mean loss from TRL's per-token log-probs (token t's log-prob of its successor's label)."""
    log_probs = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    valid = labels[:, 1:] != -100
    return -(log_probs * valid).sum() / valid.sum()


def run(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), args.dtype
    full = load_config(MODEL)
    config = full if args.hidden == full.hidden_size else scaled_config(MODEL, hidden_size=args.hidden)
    config.num_hidden_layers = args.layers
    model = build_model(config, dtype=dtype, device=device)
    add_fused_lm_head(model, outputs=TRL_OUTPUTS)
    mst.apply(model)
    ids = torch.randint(3, config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    labels = ids.clone()
    labels[:, : args.seq_len // 4] = -100  # an SFT prompt
    losses = {"trl": lambda: trl_loss(model, ids, labels), "mst": lambda: model(input_ids=ids, labels=labels).loss}
    with torch.no_grad():
        values = {name: fn().float().item() for name, fn in losses.items()}
    if abs(values["trl"] - values["mst"]) > 1e-4 * abs(values["mst"]):
        raise RuntimeError(f"the two heads disagree on the loss: {values}")

    def step(name: str):
        def run_step() -> None:
            losses[name]().backward()
            model.zero_grad(set_to_none=True)
        return run_step

    steps = {name: step(name) for name in losses}
    peaks = {name: measure_peak(fn, [model], device=device).peak_bytes for name, fn in steps.items()}
    times = round_robin(steps, rounds=args.steps, warmup=1, device=device)
    return {"environment": environment(device), "dtype": str(dtype).removeprefix("torch."), "hidden": args.hidden,
            "layers": args.layers, "vocab": config.vocab_size, "seq_len": args.seq_len, "loss": values,
            "peak_bytes": peaks, "seconds": {name: statistics.median(t) for name, t in times.items()},
            "times_s": times, "steps": args.steps}


def markdown(results: dict) -> str:
    p, s = results["peak_bytes"], results["seconds"]
    lines = [f"TRL's fused LM head vs mst's chunked LM head + loss, one training step "
             f"({results['environment']['device']}, "
             f"{results['dtype']}; Llama3-8B shape at d = {results['hidden']}, V = {results['vocab']:,}, "
             f"{results['layers']} layers with mst's MLP mini-sequences and checkpointing, {results['seq_len']:,} "
             f"tokens; median of {results['steps']} round-robin steps)", "",
             "| head | step peak MiB | step s |", "|---|---:|---:|"]
    lines += [f"| {name} | {p[name] / 2 ** 20:,.1f} | {s[name]:.3f} |" for name in ("trl", "mst")]
    lines += ["", f"mst / TRL: peak {p['mst'] / p['trl']:.2f}x, time {s['mst'] / s['trl']:.2f}x; equal losses "
                  f"({results['loss']['mst']:.6f})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--hidden", type=positive_int, default=256)
    p.add_argument("--layers", type=positive_int, default=2)
    p.add_argument("--seq-len", type=positive_int, default=4096)
    p.add_argument("--steps", type=positive_int, default=5, help="round-robin timed steps per head")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    out = resolve_device(args)
    results = run(args)
    text = markdown(results)
    write_results(out / f"trl_head_{args.device}", results, text)
    print(text)


if __name__ == "__main__":
    main()
