"""Validation, backend registry and the single-rank path of mst.distributed (no process group needed)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import mst
from mst.distributed import (reduce_gradients, setup_sequence_parallel, shard_batch, sp_loss,
                             teardown_sequence_parallel, validate_sp_config)


def config(heads: int = 8, kv: int = 4) -> LlamaConfig:
    return LlamaConfig(hidden_size=8 * heads, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=300)


@pytest.mark.parametrize("heads, kv, sp", [(8, 4, 1), (8, 4, 2), (8, 4, 4), (8, 4, 8), (8, 2, 4), (8, 1, 8)])
def test_valid_head_splits(heads: int, kv: int, sp: int) -> None:
    validate_sp_config(config(heads, kv), sp)


@pytest.mark.parametrize("heads, kv, sp, message", [
    (6, 6, 4, "num_attention_heads=6 is not divisible by sp_size=4"),
    (12, 3, 4, "num_key_value_heads=3, sp_size=4"),
    (8, 4, 0, "positive integer"),
])
def test_invalid_head_splits(heads: int, kv: int, sp: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_sp_config(config(heads, kv), sp)


def test_unknown_backend_lists_available() -> None:
    with pytest.raises(ValueError, match=r"unknown sequence-parallel backend 'ring'; available: "
                                         r"\['allgather', 'lss', 'ulysses'\]"):
        validate_sp_config(config(), 2, backend="ring")


def test_sp_above_one_needs_a_process_group() -> None:
    model = AutoModelForCausalLM.from_config(config())
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        setup_sequence_parallel(model, 2)


@pytest.mark.parametrize("strategy", ["vanilla", "mst"])
def test_single_rank_sp_loss_equals_the_model_loss(strategy: str) -> None:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config()).train()
    ids = torch.randint(0, 300, (2, 40))
    labels = ids.clone()
    labels[0, :25] = -100
    ref = copy.deepcopy(base)
    model = copy.deepcopy(base)
    if strategy == "mst":
        mst.apply(ref)
        mst.apply(model)
    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    sp = setup_sequence_parallel(model, 1)
    loss = sp_loss(model, shard_batch({"input_ids": ids, "labels": labels}, sp.rank, sp.size))
    loss.backward()
    reduce_gradients(model)  # no process group: nothing to reduce
    torch.testing.assert_close(loss, ref_loss)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert teardown_sequence_parallel(model) is model and not hasattr(model, "mst_sp")
