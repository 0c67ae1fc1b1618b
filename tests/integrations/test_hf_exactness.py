"""mst.apply on every supported family (plus one shape-generic family outside the table): the loss and EVERY
parameter gradient equal the unpatched model's (fp32, ``tests.utils.assert_exact``: ``torch.testing.assert_close``
defaults plus a relative norm error <= 1e-5, since assert_close's atol alone is loose on ~1e-3 gradients).

Sequence lengths {1, 7, 125, 2*chunk+3} with a 16-token MLP chunk cover: no valid label at all (S=1 after the
shift), no MLP split (7 or 14 tokens), and many mini-sequences with a remainder (35 x 2 = 70, 125). The LM head
uses its default M = ceil(V/d) = 4 chunks of at least d/4 = 8 tokens, which leaves a short last chunk for every
S > 1 here.
"""
from __future__ import annotations

import pytest
import torch

import mst
from tests.utils import (ALL_TYPES, MLP_CHUNK, assert_same_accumulation, assert_same_step, clone_model, make_input_ids,
                         make_labels, patched_pair, tiny_model)

SEQ_LENS = [1, 7, 125, 2 * MLP_CHUNK + 3]


@pytest.mark.parametrize("labels_kind", ["prefix", "all_but_one"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("seq", SEQ_LENS)
@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_loss_and_grads_equal(model_type, seq, batch, labels_kind):
    ref, got = patched_pair(model_type)
    ids = make_input_ids(batch, seq)
    loss = assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, labels_kind))
    if seq == 1:  # no token has a successor: HF's mean over zero tokens is NaN (and all gradients are zero)
        assert torch.isnan(loss)
        assert all((p.grad == 0).all() for p in got.parameters())


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_gradient_accumulation_three_steps(model_type):
    """Three micro-batches into the same .grad, normalised by num_items_in_batch: equal after every step."""
    assert_same_accumulation(*patched_pair(model_type))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_tied_embeddings(model_type):
    """lm_head.weight is the embedding matrix: its gradient is the sum of both uses, as in HF."""
    ref, got = patched_pair(model_type, tie_word_embeddings=True)
    assert got.lm_head.weight is got.get_input_embeddings().weight
    ids = make_input_ids(2, 2 * MLP_CHUNK + 3)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_final_logit_softcapping(model_type):
    """A small cap (0.5) makes tanh strongly nonlinear; the loss must be HF's capped loss (the official HF fork
    skipped softcapping for Gemma-2, docs/paper.md §5.2 item 6)."""
    ref, got = patched_pair(model_type, final_logit_softcapping=0.5)
    ids = make_input_ids(2, 45)
    labels = make_labels(ids, "prefix")
    loss = assert_same_step(ref, got, input_ids=ids, labels=labels)
    uncapped = tiny_model(model_type, final_logit_softcapping=None)
    with torch.no_grad():
        assert not torch.allclose(loss, uncapped(input_ids=ids, labels=labels).loss)


def test_padded_batch_with_attention_mask():
    """Right-padded row with attention_mask and ignored pad labels: still exact."""
    ref, got = patched_pair("llama")
    ids = make_input_ids(2, 50)
    mask = torch.ones_like(ids)
    ids[1, 30:], mask[1, 30:] = 0, 0
    labels = make_labels(ids, "prefix")
    labels[mask == 0] = -100
    assert_same_step(ref, got, input_ids=ids, attention_mask=mask, labels=labels)


def test_shift_labels_kwarg():
    """Pre-shifted labels (as context-parallel trainers pass them) are used as given, like HF's loss."""
    ref, got = patched_pair("qwen3")
    ids = make_input_ids(2, 33)
    shift = torch.roll(make_labels(ids, "prefix"), -1, dims=1)
    shift[:, -1] = -100
    shift[0, 5] = ids[0, 9]  # deliberately not a plain shift of labels
    assert_same_step(ref, got, input_ids=ids, labels=ids, shift_labels=shift)


@pytest.mark.parametrize("apply_kwargs", [
    {"mlp_mode": "naive"},
    {"mlp_chunk_tokens": None, "mlp_chunks": 3, "lm_head_chunks": 1},
    {"lm_head_chunk_tokens": 7},
    {"lm_head_logits_budget_bytes": 5 * 101 * 4},
    {"lm_head_chunk_tokens": 13, "lm_head_weight_grad_block_rows": 30},
    {"offload_checkpoints": True},
    {"checkpointing": False},
    {"mlp": False, "lm_head": False},  # the "ac" strategy: checkpointing only
    {"mlp": False},
    {"lm_head": False},
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_options_stay_exact(apply_kwargs):
    ref, got = patched_pair("mistral", apply_kwargs)
    ids = make_input_ids(2, 61)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_default_options_long_sequence(model_type):
    """Library defaults (MLP chunk C = 2d = 64, LM-head M = ceil(V/d)) on 2 x 1000 tokens and 3 layers."""
    ref = tiny_model(model_type, num_hidden_layers=3, max_position_embeddings=1024)
    got = mst.apply(clone_model(ref))
    ids = make_input_ids(2, 1000)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))
