"""One rank count of the LSS experiment: per backend, training steps with every collective counted.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m experiments.lss.step --out /tmp/lss_x2.json

Every rank builds the same seeded character-level model (bytes, vocab 256, like enwik8's characters), applies
MsT (``mst.apply``: mini-sequence MLP and LM-head on the local segment, per-layer checkpointing) and runs the world
as one sequence-parallel group with each backend in turn ("lss", "ulysses", "allgather"), training with
``experiments.sequence_parallel.SPStep`` (the step Table 12 measures). Data: consecutive windows of the King James
Bible's UTF-8 bytes (enwik8 is not available offline). Per backend:
1. one warm-up step (allocates AdamW's state);
2. ``--steps`` timed training steps (``shard_batch``, ``sp_loss``, backward, ``reduce_gradients``, AdamW), each
   inside ``mst.distributed.count_collectives`` (calls, payload and wire bytes per op on this rank), timed from a
   barrier (wall seconds, the slowest rank's);
3. one more step under ``mst.memory.measure.measure_peak`` (the largest per-rank peak).
The communication model (``mst.distributed.predict_step``) for the same shapes is stored beside the counts.
Rank 0 writes the JSON (with the environment header of every results file). One rank runs the plain model (no
SP: nothing is communicated) once, as "single".
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import LlamaConfig

import mst
import mst.distributed as md
from mst.distributed.comm_stats import grad_buckets
from mst.memory.measure import measure_peak

from ..cli import positive_int
from ..data import documents
from ..models import build_model
from ..results import environment, write_json
from ..sequence_parallel import SPStep

BACKENDS = ("lss", "ulysses", "allgather")


def char_config(layers: int = 2, hidden: int = 128, heads: int = 8, kv_heads: int = 8) -> LlamaConfig:
    """A small GPT-like (multi-head, like the paper's enwik8 GPT) Llama over bytes; 8 heads split over 1-8 ranks."""
    return LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                       vocab_size=256, max_position_embeddings=1 << 20, tie_word_embeddings=False)


def corpus_bytes() -> torch.Tensor:
    """The KJV as one stream of UTF-8 bytes (token ids 0..255)."""
    text = "".join(d.text for d in documents("kjv"))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def window(data: torch.Tensor, index: int, seq_len: int) -> torch.Tensor:
    """The ``index``-th consecutive ``seq_len``-byte window of the corpus as a (1, seq_len) batch."""
    return data[index * seq_len:(index + 1) * seq_len][None]


def predicted(model, sp, seq_len: int, recompute: bool) -> dict:
    cfg = model.config
    return md.predict_step(sp.backend, sp_size=sp.size, dp_size=sp.dp_size, layers=cfg.num_hidden_layers,
                           heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                           batch=1, seq_len=seq_len, grad_bytes=sum(p.numel() * p.element_size()
                                                                    for p in model.parameters()),
                           grad_buckets=grad_buckets(model), act_bytes=next(model.parameters()).element_size(),
                           recompute=recompute)


def run_backend(backend: str, args, config, data, env) -> dict:
    """Warm-up, ``--steps`` counted and timed steps, one measured step; SP set up and torn down around them."""
    model = mst.apply(build_model(config, device=env.device, dtype=torch.float32 if env.device.type == "cpu"
                                  else torch.bfloat16, attn_implementation="sdpa").train())
    sp = md.setup_sequence_parallel(model, env.world_size, backend=backend)
    trainer = SPStep(model, sp, env.device, lr=1e-3)
    trainer.step(window(data, 0, args.seq_len))  # warm-up: AdamW state, allocator
    steps = []
    for i in tqdm(range(1, args.steps + 1), desc=f"{backend} x{env.world_size}", disable=env.rank != 0):
        loss, seconds, comm = trainer.timed_step(window(data, i, args.seq_len), count=True)
        steps.append({"loss": loss, "seconds": trainer.all_max(seconds), "calls": comm.total_calls,
                      "wire_bytes": comm.total_wire_bytes, "ops": comm.summary()})
    ids = window(data, args.steps + 1, args.seq_len)
    report = measure_peak(lambda: trainer.step(ids), track=trainer.track, device=env.device)
    peak = trainer.all_max(report.allocator_peak_bytes or report.peak_bytes)
    row = {"backend": backend if env.world_size > 1 else "single", "ranks": env.world_size, "steps": steps,
           "peak_bytes": peak, "predicted": predicted(model, sp, args.seq_len, recompute=True)}
    md.teardown_sequence_parallel(model)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--seq-len", type=positive_int, default=4096, help="global sequence length (tokens = bytes)")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps per backend")
    parser.add_argument("--layers", type=positive_int, default=2)
    parser.add_argument("--hidden", type=positive_int, default=128)
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--kv-heads", type=positive_int, default=8)
    parser.add_argument("--out", required=True, help="JSON written by rank 0")
    args = parser.parse_args(argv)

    env = md.init_distributed(device=args.device)
    config = char_config(args.layers, args.hidden, args.heads, args.kv_heads)
    data = corpus_bytes()
    backends = args.backends if env.world_size > 1 else args.backends[:1]  # one rank: no SP, all the same
    rows = [run_backend(b, args, config, data, env) for b in backends]
    if env.rank == 0:
        point = {"environment": environment(env.device), "ranks": env.world_size, "device": env.device.type,
                 "backend": env.dist_backend, "seq_len": args.seq_len,
                 "config": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                              "num_attention_heads", "num_key_value_heads",
                                                              "head_dim", "vocab_size")},
                 "corpus": "KJV Bible, UTF-8 bytes", "strategy": "mst", "rows": rows}
        write_json(args.out, point)  # replaced whole: a killed run leaves no half JSON for --reuse
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
