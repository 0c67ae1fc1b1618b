"""torchrun worker for tests/distributed/test_{ulysses,lss}_torchrun.py: sequence-parallel runs vs one process.

    torchrun --standalone --nproc_per_node 2 tests/distributed/sp_worker.py [BACKEND ...]   # default: ulysses

Every rank builds the same seeded tiny Llama (fp32, sdpa), computes the unsharded reference loss and gradients
itself (plain, or with mst.apply, with or without attention=True, on the full batch), then the sequence-parallel
loss and gradients with
``mst.distributed``, and checks them with ``torch.testing.assert_close`` defaults. Rank 0 prints one
``CASE <name> OK loss=...`` line per case (names prefixed ``<backend>_`` for backends other than ulysses); any
mismatch raises, so torchrun exits non-zero. Every case also counts the step's collectives
(``count_collectives``) and checks them against the communication model (``predict_step``), and ends with
``teardown_sequence_parallel``, after which HF's ``ALL_ATTENTION_FUNCTIONS`` must hold the very functions it held
before the first setup; ``two_models_teardown`` tears down one of two SP models (the other stays exact), then
the other, then sets one up and tears it down again.
"""
from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import mst
import mst.distributed as md
from mst.distributed import predict_step
from mst.distributed.comm_stats import grad_buckets

VOCAB = 257
ORIGINAL_ATTENTION = dict(ALL_ATTENTION_FUNCTIONS)  # before any setup_sequence_parallel


def tiny_llama(kv_heads: int, heads: int = 4) -> torch.nn.Module:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=16, vocab_size=VOCAB, max_position_embeddings=512)
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
    """vanilla; mst (MLP + LM head); mst_attention (also the core attention by query chunks of 8 tokens)."""
    if strategy == "mst_attention":
        return mst.apply(model, attention=True, attention_chunk_tokens=8)
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


def check_comm(name, comm, model, sp, shard, strategy, bucket_bytes):
    """The counted collectives equal the communication model's prediction (calls and wire bytes, per op)."""
    cfg = model.config
    predicted = predict_step(sp.backend, sp_size=sp.size, dp_size=sp.dp_size, layers=cfg.num_hidden_layers,
                             heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                             batch=shard["input_ids"].shape[0], seq_len=shard["input_ids"].shape[1] * sp.size,
                             grad_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                             grad_buckets=grad_buckets(model, bucket_bytes), recompute=strategy != "vanilla")
    counted = comm.summary()
    assert set(counted) == set(predicted), f"{name}: ops {sorted(counted)} != predicted {sorted(predicted)}"
    for op, row in predicted.items():
        assert counted[op]["calls"] == row["calls"], f"{name}: {op} calls {counted[op]} != {row}"
        assert abs(counted[op]["wire_bytes"] - row["wire_bytes"]) <= 1e-9 * row["wire_bytes"], f"{name}: {op}"


def run_case(name, *, strategy, kv_heads, batch, seq, heads=4, sp_size=None, ignore=False, pad=False,
             bucket_bytes=1024 ** 2, backend="ulysses"):
    world, rank = dist.get_world_size(), dist.get_rank()
    sp_size = sp_size or world
    name = name if backend == "ulysses" else f"{backend}_{name}"
    base = tiny_llama(kv_heads, heads)
    replicas = world // sp_size
    batches = [make_batch(batch, seq, seed=100 + r, ignore=ignore) for r in range(replicas)]
    ref_losses, ref_grads = reference(base, strategy, batches)

    model = prepare(copy.deepcopy(base), strategy)
    sp = md.setup_sequence_parallel(model, sp_size, backend=backend)
    assert (sp.dp_rank, sp.rank) == divmod(rank, sp_size), f"{name}: grid placement {sp}"
    shard = md.shard_batch(batches[sp.dp_rank], sp.rank, sp.size, pad=pad)
    with md.count_collectives() as comm:
        loss = md.sp_loss(model, shard)
        loss.backward()
        md.reduce_gradients(model, bucket_bytes=bucket_bytes)
    check_comm(name, comm, model, sp, shard, strategy, bucket_bytes)

    torch.testing.assert_close(loss.detach(), ref_losses[sp.dp_rank])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=lambda m, n=n: f"{name}: grad of {n}: {m}")
    # the router must leave an unsharded model alone: its loss is still the reference
    again = prepare(copy.deepcopy(base), strategy)
    torch.testing.assert_close(again(**batches[0]).loss.detach(), ref_losses[0])
    md.teardown_sequence_parallel(model)
    assert_attention_restored(name)
    if rank == 0:
        print(f"CASE {name} OK loss={loss.item():.6f}", flush=True)


def assert_attention_restored(name):
    """No sequence-parallel model is left: every registry entry is the original function again."""
    now = dict(ALL_ATTENTION_FUNCTIONS)
    changed = sorted(k for k in ORIGINAL_ATTENTION.keys() | now.keys() if now.get(k) is not ORIGINAL_ATTENTION.get(k))
    assert not changed, f"{name}: ALL_ATTENTION_FUNCTIONS entries {changed} not restored by teardown"


def run_teardown_case(backend):
    """Two SP models routed through one registry entry, torn down one at a time, then one set up again."""
    name = "two_models_teardown" if backend == "ulysses" else f"{backend}_two_models_teardown"
    world = dist.get_world_size()
    base = tiny_llama(kv_heads=2)
    batch = make_batch(1, 64, seed=7, ignore=True)
    expected = base(**batch).loss.detach()

    def sp_step(model):
        sp = md.setup_sequence_parallel(model, world, backend=backend)
        return md.sp_loss(model, md.shard_batch(batch, sp.rank, sp.size)).detach()

    first, second = copy.deepcopy(base), copy.deepcopy(base)
    torch.testing.assert_close(sp_step(first), expected)
    torch.testing.assert_close(sp_step(second), expected)
    md.teardown_sequence_parallel(first)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not ORIGINAL_ATTENTION["sdpa"], f"{name}: second lost its routing"
    torch.testing.assert_close(md.sp_loss(second, md.shard_batch(batch, second.mst_sp.rank, world)).detach(),
                               expected)
    md.teardown_sequence_parallel(second)
    assert_attention_restored(name)
    torch.testing.assert_close(sp_step(first), expected)
    torch.testing.assert_close(sp_step(first), expected)  # set up again without teardown: replaces, not stacks
    md.teardown_sequence_parallel(first)
    assert_attention_restored(name)
    torch.testing.assert_close(first(**batch).loss.detach(), expected)
    if dist.get_rank() == 0:
        print(f"CASE {name} OK", flush=True)


def expect_error(name, fn, text):
    try:
        fn()
    except ValueError as err:
        assert text in str(err), f"{name}: unexpected message {err}"
        if dist.get_rank() == 0:
            print(f"CASE {name} OK error={err}", flush=True)
        return
    raise AssertionError(f"{name}: no ValueError")


def run_backend(backend: str, world: int) -> None:
    """Exactness cases for one backend; Ulysses' head-count error is a passing case for the others."""
    case = lambda name, **kw: run_case(name, backend=backend, **kw)  # noqa: E731
    case("vanilla_mha_bs1", strategy="vanilla", kv_heads=4, batch=1, seq=64)
    # 16 KiB buckets: the embedding / LM-head gradients (64 KiB) are reduced in place, the rest in several buckets
    case("mst_gqa_bs2_ignored", strategy="mst", kv_heads=2, batch=2, seq=64, ignore=True, bucket_bytes=16384)
    case("mst_odd_len_padded", strategy="mst", kv_heads=2, batch=2, seq=64 - 3, ignore=True, pad=True)
    case("mst_attention_gqa_bs2", strategy="mst_attention", kv_heads=2, batch=2, seq=64 - 3, ignore=True, pad=True)
    if backend != "ulysses":
        case("mst_heads_not_divisible", strategy="mst", kv_heads=1, heads=world // 2, batch=1, seq=64)
    if world == 4:
        case("vanilla_kv_replicated_bs2", strategy="vanilla", kv_heads=2, batch=2, seq=64, ignore=True)
        case("mst_sp2_dp2", strategy="mst", kv_heads=2, batch=2, seq=64, sp_size=2, ignore=True)
    run_teardown_case(backend)


def main():
    backends = sys.argv[1:] or ["ulysses"]
    env = md.init_distributed(device="cpu")
    world = env.world_size
    for backend in backends:
        run_backend(backend, world)
    if "ulysses" in backends:
        expect_error("odd_len_unpadded", lambda: md.shard_batch(make_batch(1, 61, 0, False), 0, world),
                     "not divisible by the SP size")
        if world == 4:
            expect_error("heads_not_divisible", lambda: md.setup_sequence_parallel(tiny_llama(kv_heads=1), 8),
                         "num_attention_heads=4 is not divisible by sp_size=8")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
