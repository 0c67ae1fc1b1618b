"""``mst.apply(model, norms=True)``: the hidden-state norms (every decoder layer's, the final one) run in
mini-sequences too.

Exact like the MLP (the same test matrix: every family, S in {1, 7, 125, 2*chunk+3}, batch 1/2, ignored labels,
gradient accumulation, tied embeddings, softcapping via the Gemma rows; bf16 no worse than vanilla in
tests/integrations/test_hf_bf16.py), composing with
the other options, copies and sequence parallelism; and it saves what it promises: a patched norm keeps only its
input for backward, where HF's RMSNorm keeps an fp32 copy of its input and the normalised x besides.
"""
from __future__ import annotations

import copy

import pytest
import torch

import mst
from mst.distributed import (reduce_gradients, setup_sequence_parallel, shard_batch, sp_loss,
                             teardown_sequence_parallel)
from tests.integrations.test_hf_copies import pickle_round_trip
from tests.utils import (ALL_TYPES, MLP_CHUNK, assert_same_accumulation, assert_same_step, clone_model, make_input_ids,
                         make_labels, patched_pair, saved_tensor_bytes, tiny_model)

NORMS = {"norms": True}
SEQ_LENS = [1, 7, 125, 2 * MLP_CHUNK + 3]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("seq", SEQ_LENS)
@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_loss_and_grads_equal(model_type, seq, batch):
    ref, got = patched_pair(model_type, NORMS)
    ids = make_input_ids(batch, seq)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "all_but_one" if batch == 1 else "prefix"))


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "cohere"])
def test_gradient_accumulation_three_steps(model_type):
    assert_same_accumulation(*patched_pair(model_type, NORMS))


def test_tied_embeddings():
    ref, got = patched_pair("qwen2", NORMS, tie_word_embeddings=True)
    ids = make_input_ids(2, 2 * MLP_CHUNK + 3)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))


@pytest.mark.parametrize("apply_kwargs", [
    {"mlp_mode": "naive"},  # the naive mode is the MLP's; norms still recompute
    {"mlp_chunks": 3, "mlp_chunk_tokens": None},
    {"offload_checkpoints": True},
    {"checkpointing": False},
    {"mlp": False, "lm_head": False},
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_composes_with_other_options(apply_kwargs):
    ref, got = patched_pair("mistral", {**NORMS, **apply_kwargs})
    ids = make_input_ids(2, 61)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))


@pytest.mark.parametrize("model_type", ["llama", "cohere"])  # an RMSNorm, and Cohere's mean-centred LayerNorm
def test_patched_norm_saves_only_its_input(model_type):
    ref = tiny_model(model_type)
    got = mst.apply(clone_model(ref), mlp=False, lm_head=False, checkpointing=False, norms=True, mlp_chunk_tokens=16)
    x = torch.randn(2, 128, ref.config.hidden_size, requires_grad=True)
    x_bytes = x.numel() * x.element_size()
    saved = {}
    for name, model in (("plain", ref), ("mst", got)):
        norm = model.model.layers[0].input_layernorm
        out, saved[name], largest = saved_tensor_bytes(lambda n=norm: n(x), exclude=list(norm.parameters()))
        out.sum().backward()
    assert saved["mst"] == x_bytes
    assert saved["plain"] >= 2 * x_bytes  # HF's norm keeps at least a normalised copy besides its input


def test_revert_and_copies():
    ref = tiny_model("gemma2")
    patched = mst.apply(clone_model(ref), mlp_chunk_tokens=MLP_CHUNK, norms=True)
    patches = [n for n, m in patched.named_modules() if "forward" in m.__dict__]
    assert sum("norm" in n for n in patches) == 4 * ref.config.num_hidden_layers + 1  # + the final norm
    ids = make_input_ids(2, 2 * MLP_CHUNK + 3)
    batch = {"input_ids": ids, "labels": make_labels(ids, "prefix")}
    assert_same_step(ref, copy.deepcopy(patched), **batch)
    assert all(p.grad is None for p in patched.parameters()), "gradients reached the original"
    assert_same_step(clone_model(ref), pickle_round_trip(patched), **batch)
    mst.revert(patched)
    assert not [n for n, m in patched.named_modules() if "forward" in m.__dict__]


def test_single_rank_sequence_parallel():
    """The sequence-parallel loss path (shifted labels, the SP attention router) on a norms-patched model."""
    ref, got = patched_pair("llama", NORMS)
    ids = make_input_ids(2, 40)
    labels = make_labels(ids, "prefix")
    ref(input_ids=ids, labels=labels).loss.backward()
    sp = setup_sequence_parallel(got, 1)
    try:
        loss = sp_loss(got, shard_batch({"input_ids": ids, "labels": labels}, sp.rank, sp.size))
        loss.backward()
        reduce_gradients(got)
    finally:
        teardown_sequence_parallel(got)
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
