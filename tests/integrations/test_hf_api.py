"""The contract of ``mst.apply`` / ``mst.revert`` beyond exactness: logits and ``generate()`` without labels,
idempotence, reversibility, option handling and clear errors for bad options."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

import mst
from mst.integrations import options_dict
from tests.utils import assert_exact, assert_grads_close, clone_model, make_input_ids, make_labels, tiny_model


def patched_modules(model) -> list[str]:
    """Names of modules whose forward is an instance attribute (i.e. replaced by mst.apply)."""
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "phi3"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_logits_without_labels(model_type, train):
    ref = tiny_model(model_type).train(train)
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=16).train(train)
    ids = make_input_ids(2, 45)
    out_ref, out_got = ref(input_ids=ids), got(input_ids=ids)
    assert out_got.logits is not None and out_got.loss is None
    assert_exact(out_got.logits, out_ref.logits, "logits")
    if train:  # the logits are differentiable through the chunked MLPs and the checkpointed layers
        out_ref.logits.square().mean().backward()
        out_got.logits.square().mean().backward()
        assert_grads_close(got, ref)


def test_labels_give_loss_first_and_no_logits():
    """HF's output layout with labels: loss is out[0] and the first tuple element, logits absent (None)."""
    ref = tiny_model("llama")
    model = mst.apply(clone_model(ref))
    ids = make_input_ids(1, 20)
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and out.loss.ndim == 0 and "logits" not in out.keys()
    assert out[0] is out.loss
    out_pos = model(ids, None, None, None, None, ids)  # labels passed positionally (6th parameter)
    torch.testing.assert_close(out_pos.loss, out.loss)
    as_tuple = model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], ref(input_ids=ids, labels=ids, return_dict=False)[0])


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_generate_after_apply(model_type):
    ref = tiny_model(model_type).eval()
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=4).eval()  # a 40-token prompt is split in 10 chunks
    prompt = make_input_ids(2, 40)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = ref.generate(prompt, **kwargs)
    generated = got.generate(prompt, **kwargs)
    assert generated.shape == (2, 46)
    torch.testing.assert_close(generated, expected, rtol=0, atol=0)


def test_apply_is_idempotent():
    """Applying twice equals applying once: patches are replaced, never stacked on top of each other."""
    ref = tiny_model("qwen2")
    once = mst.apply(clone_model(ref), mlp_chunk_tokens=16)
    twice = mst.apply(mst.apply(clone_model(ref), mlp_chunk_tokens=16), mlp_chunk_tokens=16)
    assert patched_modules(once) == patched_modules(twice)
    for mlp in (layer.mlp for layer in twice.model.layers):
        assert mlp.forward.__wrapped__.__func__ is type(mlp).forward  # wraps the class forward, not a patch
    assert twice.forward.__wrapped__.__func__ is type(twice).forward
    ids = make_input_ids(2, 50)
    labels = make_labels(ids, "prefix")
    for model in (once, twice):
        model(input_ids=ids, labels=labels).loss.backward()
    torch.testing.assert_close(twice(input_ids=ids, labels=labels).loss, once(input_ids=ids, labels=labels).loss)
    assert_grads_close(twice, once)


def test_apply_again_replaces_options():
    model = mst.apply(tiny_model("llama"), mlp_chunk_tokens=16)
    assert options_dict(model)["mlp_chunk_tokens"] == 16
    mst.apply(model, mlp=False, lm_head=False)
    assert patched_modules(model) == []
    assert model.is_gradient_checkpointing
    assert options_dict(model)["mlp"] is False


def test_revert_restores_class_forwards():
    ref = tiny_model("gemma")
    model = mst.apply(clone_model(ref), mlp_chunk_tokens=16, offload_checkpoints=True)
    assert len(patched_modules(model)) == 1 + ref.config.num_hidden_layers  # the CausalLM and every MLP
    assert model.is_gradient_checkpointing
    assert mst.revert(model) is model
    assert patched_modules(model) == []
    assert not model.is_gradient_checkpointing
    assert not hasattr(model, "mst_options") and options_dict(model) == {}
    ids = make_input_ids(2, 30)
    out, out_ref = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, out_ref.loss)
    torch.testing.assert_close(out.logits, out_ref.logits)
    assert mst.revert(model) is model  # reverting an unpatched model is a no-op


def test_revert_keeps_user_checkpointing_when_apply_did_not_enable_it():
    model = tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mst.revert(mst.apply(model, checkpointing=False))
    assert model.is_gradient_checkpointing


@pytest.mark.parametrize("option", ["mlp_chunk_tokens", "mlp_chunks", "lm_head_chunk_tokens", "lm_head_chunks",
                                    "lm_head_logits_budget_bytes"])
@pytest.mark.parametrize("value", [0, -4, 2.5])
def test_non_positive_chunk_raises(option, value):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=option):
        mst.apply(model, **{option: value})
    assert patched_modules(model) == []  # validation happens before anything is patched


@pytest.mark.parametrize("kwargs,match", [
    ({"mlp_chunk_tokens": 8, "mlp_chunks": 2}, "not both"),
    ({"lm_head_chunks": 2, "lm_head_chunk_tokens": 8}, "at most one"),
    ({"mlp_mode": "fast"}, "mlp_mode"),
])
def test_conflicting_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mst.apply(tiny_model("llama"), **kwargs)


def test_unknown_option_raises_type_error():
    with pytest.raises(TypeError, match="mlp_chunk_size"):
        mst.apply(tiny_model("llama"), mlp_chunk_size=16)


def test_lm_head_budget_below_one_token_raises_at_call():
    model = mst.apply(tiny_model("llama"), lm_head_logits_budget_bytes=8)
    ids = make_input_ids(1, 10)
    with pytest.raises(ValueError, match="below one token"):
        model(input_ids=ids, labels=ids)


@pytest.mark.parametrize("options,n_tokens,calls", [
    ({}, 300, 5),  # default C = 2d = 64 tokens: ceil(300 / 64)
    ({}, 64, 1),  # at most C tokens: no split
    ({"mlp_chunk_tokens": 7}, 100, 15),
    ({"mlp_chunks": 3}, 100, 3),
])
def test_mlp_mini_sequence_count(options, n_tokens, calls):
    """The MLP runs once per mini-sequence: the default C = 2d, or the requested size / count."""
    model = tiny_model("llama").eval()
    mlp_cls = type(model.model.layers[0].mlp)
    with mock.patch.object(mlp_cls, "forward", autospec=True, side_effect=mlp_cls.forward) as spy:
        mst.apply(model, **options)
        with torch.no_grad():
            model(input_ids=make_input_ids(2, n_tokens // 2))
    assert spy.call_count == calls * model.config.num_hidden_layers
