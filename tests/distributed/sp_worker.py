"""torchrun worker for tests/distributed/test_ulysses_torchrun.py: sequence-parallel runs vs one process.

    torchrun --standalone --nproc_per_node 2 tests/distributed/sp_worker.py

Every rank builds the same seeded tiny Llama (fp32, sdpa), computes the unsharded reference loss and gradients
itself (plain, or with mst.apply, on the full batch), then the sequence-parallel loss and gradients with
``mst.distributed``, and checks them with ``torch.testing.assert_close`` defaults. Rank 0 prints one
``CASE <name> OK loss=...`` line per case; any mismatch raises, so torchrun exits non-zero.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig

import mst
import mst.distributed as md

VOCAB = 257


def tiny_llama(kv_heads: int) -> torch.nn.Module:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=512)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().train()


def make_batch(batch: int, seq: int, seed: int, ignore: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    if ignore:  # a masked prompt long enough that rank 0's whole shard of row 0 has no valid label
        labels[0, : seq * 3 // 4] = -100
        labels[-1, 1::3] = -100
    return {"input_ids": ids, "labels": labels}


def prepare(model: torch.nn.Module, strategy: str) -> torch.nn.Module:
    return mst.apply(model) if strategy == "mst" else model


def reference(base, strategy, batches):
    """Unsharded loss per batch and the gradient averaged over batches (what DP replicas average to)."""
    model = prepare(copy.deepcopy(base), strategy)
    losses = []
    for b in batches:
        loss = model(**b).loss
        (loss / len(batches)).backward()
        losses.append(loss.detach())
    return losses, {n: p.grad for n, p in model.named_parameters()}


def run_case(name, *, strategy, kv_heads, batch, seq, sp_size=None, ignore=False, pad=False,
             bucket_bytes=1024 ** 2):
    world, rank = dist.get_world_size(), dist.get_rank()
    sp_size = sp_size or world
    base = tiny_llama(kv_heads)
    replicas = world // sp_size
    batches = [make_batch(batch, seq, seed=100 + r, ignore=ignore) for r in range(replicas)]
    ref_losses, ref_grads = reference(base, strategy, batches)

    model = prepare(copy.deepcopy(base), strategy)
    sp = md.setup_sequence_parallel(model, sp_size)
    shard = md.shard_batch(batches[rank // sp_size], sp.rank, sp.size, pad=pad)
    loss = md.sp_loss(model, shard)
    loss.backward()
    md.reduce_gradients(model, bucket_bytes=bucket_bytes)

    torch.testing.assert_close(loss.detach(), ref_losses[rank // sp_size])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=lambda m, n=n: f"{name}: grad of {n}: {m}")
    # the router must leave an unsharded model alone: its loss is still the reference
    again = prepare(copy.deepcopy(base), strategy)
    torch.testing.assert_close(again(**batches[0]).loss.detach(), ref_losses[0])
    if rank == 0:
        print(f"CASE {name} OK loss={loss.item():.6f}", flush=True)


def expect_error(name, fn, text):
    try:
        fn()
    except ValueError as err:
        assert text in str(err), f"{name}: unexpected message {err}"
        if dist.get_rank() == 0:
            print(f"CASE {name} OK error={err}", flush=True)
        return
    raise AssertionError(f"{name}: no ValueError")


def main():
    env = md.init_distributed(device="cpu")
    world = env.world_size
    run_case("vanilla_mha_bs1", strategy="vanilla", kv_heads=4, batch=1, seq=64)
    # 16 KiB buckets: the embedding / LM-head gradients (64 KiB) are reduced in place, the rest in several buckets
    run_case("mst_gqa_bs2_ignored", strategy="mst", kv_heads=2, batch=2, seq=64, ignore=True, bucket_bytes=16384)
    run_case("mst_odd_len_padded", strategy="mst", kv_heads=2, batch=2, seq=64 - 3, ignore=True, pad=True)
    expect_error("odd_len_unpadded", lambda: md.shard_batch(make_batch(1, 61, 0, False), 0, world),
                 "not divisible by the SP size")
    if world == 4:
        run_case("vanilla_kv_replicated_bs2", strategy="vanilla", kv_heads=2, batch=2, seq=64, ignore=True)
        run_case("mst_sp2_dp2", strategy="mst", kv_heads=2, batch=2, seq=64, sp_size=2, ignore=True)
        expect_error("heads_not_divisible", lambda: md.setup_sequence_parallel(tiny_llama(kv_heads=1), 8),
                     "num_attention_heads=4 is not divisible by sp_size=8")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
