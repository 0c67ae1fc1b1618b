"""``mst.apply(model, attention=True)``: every layer's core attention by query chunks (mini-sequence attention).

The MLP's test matrix (every family, S in {1, 7, 125, 2*chunk+3}, batch 1/2, ignored labels, gradient accumulation,
tied embeddings; sliding windows and Gemma-2's attention softcap through the family rows), padding masks, generation
with a cache, copies, revert, composition with the other options, the clear errors; bf16 rows are in
tests/integrations/test_hf_bf16.py and the Ulysses composition in tests/distributed/test_ulysses_torchrun.py.
Multimodal wrappers: Gemma-3 and Llava exact with an image; PaliGemma refused by the apply-time check.
"""
from __future__ import annotations

import copy

import pytest
import torch

import mst
from mst.integrations.attention import CHUNK_ATTR, MINI_SEQUENCE_ATTENTION
from tests.integrations.test_hf_copies import pickle_round_trip
from tests.integrations.test_hf_wrapped import assert_same_multimodal_step
from tests.utils import (ALL_TYPES, IMAGE_TOKEN, IMAGE_TOKENS_PER_IMAGE, MLP_CHUNK, TEXT_VOCAB, TINY_VISION,
                         MaxNumelMode, assert_same_accumulation, assert_same_step, clone_model, make_input_ids,
                         make_labels, patched_pair, tiny_model, tiny_multimodal_model)

ATTENTION = {"attention": True, "attention_chunk_tokens": MLP_CHUNK}
SEQ_LENS = [1, 7, 125, 2 * MLP_CHUNK + 3]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("seq", SEQ_LENS)
@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_loss_and_grads_equal(model_type, seq, batch):
    ref, got = patched_pair(model_type, ATTENTION)
    ids = make_input_ids(batch, seq)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "all_but_one" if batch == 1 else "prefix"))
    assert got.config._attn_implementation == MINI_SEQUENCE_ATTENTION


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "mistral"])
def test_gradient_accumulation_three_steps(model_type):
    assert_same_accumulation(*patched_pair(model_type, ATTENTION))


def test_tied_embeddings():
    ref, got = patched_pair("qwen2", ATTENTION, tie_word_embeddings=True)
    ids = make_input_ids(2, 2 * MLP_CHUNK + 3)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3", "gemma3_text"])
def test_padding_mask(model_type):
    """Left and right padding: HF builds SDPA's boolean mask, which each query chunk slices. Padded positions are
    unlabelled (their outputs are not defined alike by eager and SDPA: a query that sees no key)."""
    ref, got = patched_pair(model_type, ATTENTION)
    ids = make_input_ids(2, 70)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    mask[1, -5:] = 0
    labels = make_labels(ids, "prefix").masked_fill(mask == 0, -100)
    assert_same_step(ref, got, input_ids=ids, attention_mask=mask, labels=labels)


def test_packed_sequences_by_position_ids():
    """Two documents packed in one row (positions restart): HF's SDPA mask keeps them apart, and so does the op.
    (``use_cache=False``: HF looks for packing only without a cache, and the unpatched model in train mode would
    make one.)"""
    ref, got = patched_pair("llama", ATTENTION)
    ids = make_input_ids(1, 60)
    position_ids = torch.cat([torch.arange(25), torch.arange(35)])[None]
    assert_same_step(ref, got, input_ids=ids, position_ids=position_ids, labels=make_labels(ids, "full"),
                     use_cache=False)


@pytest.mark.parametrize("apply_kwargs", [
    {"norms": True},
    {"offload_checkpoints": True},
    {"checkpointing": False},
    {"mlp": False, "lm_head": False},
    {"attention_chunk_tokens": None},  # the op's default: one chunk at these lengths
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_composes_with_other_options(apply_kwargs):
    ref, got = patched_pair("mistral", {**ATTENTION, **apply_kwargs})
    ids = make_input_ids(2, 61)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_generate_with_a_cache(model_type):
    """Decoding: one query against the cached keys (lower-right causal), in eval and in train mode."""
    ref = tiny_model(model_type).eval()
    got = mst.apply(clone_model(ref), **ATTENTION).eval()
    prompt = make_input_ids(2, 40)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = ref.generate(prompt, **kwargs)
    torch.testing.assert_close(got.generate(prompt, **kwargs), expected, rtol=0, atol=0)
    torch.testing.assert_close(got.train().generate(prompt, **kwargs), expected, rtol=0, atol=0)


def test_no_s_by_s_tensor_in_a_training_step():
    """Vanilla SDPA on CPU makes (B, H, S, S) scores; with attention=True the largest score-like tensor is one
    chunk's (B, H, C, S)."""
    seq, chunk = 256, 16
    ids = make_input_ids(1, seq)
    largest = {}
    for name, options in (("vanilla", {"attention": False}), ("mst", {"attention_chunk_tokens": chunk})):
        model = mst.apply(tiny_model("llama", attn_implementation="eager"), mlp_chunk_tokens=MLP_CHUNK,
                          **{"attention": True, **options})
        with MaxNumelMode(with_dim=seq) as mode:
            model(input_ids=ids, labels=ids).loss.backward()
        largest[name] = mode.max_numel
    heads = tiny_model("llama").config.num_attention_heads
    assert largest["vanilla"] >= heads * seq * seq
    assert largest["mst"] <= heads * chunk * seq, largest


def test_revert_restores_the_implementation_and_modules():
    model = tiny_model("gemma2")
    before = model.config._attn_implementation
    fresh = tiny_model("gemma2")
    mst.apply(model, **ATTENTION)
    assert getattr(model.model.layers[0].self_attn, CHUNK_ATTR) == MLP_CHUNK
    mst.revert(model)
    assert model.config._attn_implementation == before
    for (name, m), m0 in zip(model.named_modules(), fresh.modules()):
        assert m.__dict__.keys() == m0.__dict__.keys(), name
    mst.apply(model, **ATTENTION)
    mst.apply(model, attention=False)  # re-apply without the option: HF's attention again
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("copy_kind", ["deepcopy", "pickle"])
def test_copies_keep_mini_sequence_attention(copy_kind):
    ref, got = patched_pair("qwen2", ATTENTION)
    copied = copy.deepcopy(got) if copy_kind == "deepcopy" else pickle_round_trip(got)
    assert copied.config._attn_implementation == MINI_SEQUENCE_ATTENTION
    assert getattr(copied.model.layers[1].self_attn, CHUNK_ATTR) == MLP_CHUNK
    ids = make_input_ids(2, 50)
    assert_same_step(ref, copied, input_ids=ids, labels=make_labels(ids, "prefix"))


@pytest.mark.parametrize("model_type", ["gemma3", "llava"])
def test_multimodal_with_an_image_is_exact(model_type):
    """The text model's attention only (the vision tower keeps its own); Gemma-3's image tokens attend to each other
    both ways through HF's mask, which the op slices."""
    ref = tiny_multimodal_model(model_type)
    got = mst.apply(clone_model(ref), **ATTENTION)
    assert got.config.get_text_config()._attn_implementation == MINI_SEQUENCE_ATTENTION
    assert got.config.vision_config._attn_implementation == ref.config.vision_config._attn_implementation
    ids = make_input_ids(2, 30, TEXT_VOCAB)
    ids[:, :IMAGE_TOKENS_PER_IMAGE] = IMAGE_TOKEN
    pixels = torch.randn(2, 3, TINY_VISION["image_size"], TINY_VISION["image_size"],
                         generator=torch.Generator().manual_seed(0))
    assert_same_multimodal_step(ref, got, input_ids=ids, pixel_values=pixels, labels=make_labels(ids, "prefix"))


def test_paligemma_is_refused_by_the_apply_time_check():
    """PaliGemma (outside the family table) does not reproduce its own loss with attention=True, so apply refuses it
    and leaves it as it was (the cause of the difference is not traced yet: a known gap, refused rather than wrong)."""
    model = tiny_multimodal_model("paligemma")
    before = model.config.get_text_config()._attn_implementation
    with pytest.raises(ValueError, match="does not reproduce its own loss"):
        mst.apply(model, **ATTENTION)
    assert model.config.get_text_config()._attn_implementation == before
    assert getattr(model, "mst_options", None) is None


def test_attention_dropout_is_refused():
    with pytest.raises(ValueError, match="attention_dropout"):
        mst.apply(tiny_model("llama", attention_dropout=0.1), attention=True)


def test_option_errors():
    with pytest.raises(ValueError, match="attention_chunk_tokens"):
        mst.apply(tiny_model("llama"), attention=True, attention_chunk_tokens=0)
    with pytest.raises(TypeError, match="attention"):
        mst.apply(tiny_model("llama"), attention="yes")


def test_sequence_parallel_model_refuses_a_change_of_implementation():
    """Sequence parallelism wrapped the implementation the model had at setup: switching it afterwards would run
    the model unsharded, so apply and revert refuse (here with the placement SP leaves on the model)."""
    model = mst.apply(tiny_model("llama"))
    model.mst_sp = type("Placement", (), {"size": 2})()
    with pytest.raises(ValueError, match="before setup_sequence_parallel"):
        mst.apply(model, attention=True)
    del model.mst_sp
    mst.apply(model, attention=True)
    model.mst_sp = type("Placement", (), {"size": 2})()
    mst.apply(model, attention=True, attention_chunk_tokens=8)  # no change of implementation: allowed
    with pytest.raises(ValueError, match="before setup_sequence_parallel"):
        mst.revert(model)
