"""Numeric inputs of the mst.distributed setup and helper functions: nonsense is a clear error, not a silent
default, a ZeroDivisionError or a half-undone setup (one-process gloo group where a group is needed)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig

from mst.distributed import (init_distributed, predict_step, reduce_gradients, rendezvous_from_env,
                             setup_sequence_parallel, shard_batch)
from mst.distributed.loss import gradient_buckets

MASTER = {"MASTER_ADDR": "node1", "MASTER_PORT": "29500"}


def tiny() -> torch.nn.Module:
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sp_size_must_divide_the_world_and_a_refused_setup_keeps_the_old_one(one_rank_group) -> None:
    model = tiny()
    before = setup_sequence_parallel(model, 1)
    with pytest.raises(ValueError, match="sp_size=2 must divide the world size 1"):
        setup_sequence_parallel(model, 2)
    assert model.mst_sp is before  # was torn down before the world size was checked


@pytest.mark.parametrize("bucket_bytes", [0, -1, 1.5, True])
def test_bucket_bytes_must_be_a_positive_integer(bucket_bytes) -> None:
    model = tiny()
    with pytest.raises(ValueError, match="bucket_bytes must be a positive integer"):
        reduce_gradients(model, bucket_bytes=bucket_bytes)  # also without a process group
    with pytest.raises(ValueError, match="bucket_bytes must be a positive integer"):
        gradient_buckets([torch.zeros(3)], bucket_bytes)


SHAPE = dict(sp_size=2, dp_size=1, layers=2, heads=4, kv_heads=2, head_dim=16, batch=1, seq_len=64, grad_bytes=0)


@pytest.mark.parametrize("change, message", [
    (dict(sp_size=0), "sp_size must be a positive integer, got 0"),  # was ZeroDivisionError
    (dict(layers=-2), "layers must be a positive integer"),  # was a negative call count
    (dict(seq_len=63), "seq_len 63 is not divisible by sp_size=2"),  # was floored
    (dict(batch=1.5), "batch must be a positive integer"),
    (dict(grad_bytes=-8), "grad_bytes must be a non-negative integer"),
    (dict(grad_buckets=0), "grad_buckets must be a positive integer"),
])
def test_predict_step_rejects_nonsense(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        predict_step("lss", **{**SHAPE, **change})


def test_predict_step_counts_the_shard_shape_check() -> None:
    ops = predict_step("ulysses", **SHAPE)
    assert ops["all_gather_into_tensor"] == {"calls": 1, "payload_bytes": 32, "wire_bytes": 16.0}


@pytest.mark.parametrize("timeout_s", [0, -5, math.nan, math.inf, "600"])
def test_init_distributed_rejects_a_nonsense_timeout(timeout_s) -> None:
    with pytest.raises(ValueError, match="timeout_s must be a positive finite number"):
        init_distributed(device="cpu", timeout_s=timeout_s)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1", **MASTER}, "local rank -1 must be non-negative"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "-3"}, "local rank -3 must be non-negative"),
    ({"RANK": "0", "WORLD_SIZE": "0", **MASTER}, "world size 0 must be positive"),
])
def test_rendezvous_rejects_nonsense_ranks(env: dict, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        rendezvous_from_env(env)


@pytest.mark.parametrize("rank, sp", [(False, 2), (0, True)])
def test_shard_batch_refuses_bools(rank, sp) -> None:
    ids = torch.arange(8).view(1, 8)
    with pytest.raises(ValueError, match="0 <= rank < sp"):
        shard_batch({"input_ids": ids, "labels": ids}, rank, sp)
