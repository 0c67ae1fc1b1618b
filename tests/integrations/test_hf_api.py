"""The contract of ``mst.apply`` / ``mst.revert`` beyond exactness: logits and ``generate()`` without labels,
idempotence, reversibility, option handling and clear errors for bad options."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

import mst
from mst.integrations import options_dict
from tests.utils import (GENERIC_FAMILY, assert_exact, assert_grads_close, assert_same_step, clone_model,
                         make_input_ids, make_labels, tiny_model)


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


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_generate_in_train_mode_keeps_the_cache(model_type):
    """``generate()`` on a patched model left in train mode: checkpointing is on only while autograd records, so
    HF keeps the KV cache and every token equals eval-mode generation (HF's own checkpointing drops the cache and
    gets tokens after the first wrong); training right after still checkpoints and stays exact."""
    ref = tiny_model(model_type).eval()
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=4).train()
    prompt = make_input_ids(2, 40)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got.generate(prompt, **kwargs), ref.generate(prompt, **kwargs), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(got(prompt).logits, ref(prompt).logits)
    assert got.train().is_activation_checkpointing
    ids = make_input_ids(2, 35)
    assert_same_step(ref.train(), got, input_ids=ids, labels=make_labels(ids, "prefix"))


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


def test_revert_restores_user_checkpointing_state():
    """The user's checkpointing (on, with their own function) survives apply + revert unchanged, and apply adds no
    hook of its own (HF's enable leaves one on the input embeddings that its disable does not remove)."""
    model = tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    before = {name: (m.gradient_checkpointing, m._gradient_checkpointing_func)
              for name, m in model.named_modules() if hasattr(m, "gradient_checkpointing")}
    hooks = {name: dict(m._forward_hooks) for name, m in model.named_modules()}
    mst.apply(model)
    assert all(m._gradient_checkpointing_func.keywords == {"use_reentrant": False}
               for m in model.modules() if hasattr(m, "_gradient_checkpointing_func"))
    mst.revert(model)
    after = {name: (m.gradient_checkpointing, m._gradient_checkpointing_func)
             for name, m in model.named_modules() if hasattr(m, "gradient_checkpointing")}
    assert after == before
    assert {name: dict(m._forward_hooks) for name, m in model.named_modules()} == hooks


def test_revert_leaves_no_checkpointing_state_behind():
    model = tiny_model("llama")
    fresh = tiny_model("llama")
    mst.revert(mst.apply(model))
    for (name, m), m0 in zip(model.named_modules(), fresh.modules()):
        assert m.__dict__.keys() == m0.__dict__.keys(), name
        assert m._forward_hooks.keys() == m0._forward_hooks.keys(), name


@pytest.mark.parametrize("option", ["mlp_chunk_tokens", "mlp_chunks", "lm_head_chunk_tokens", "lm_head_chunks",
                                    "lm_head_logits_budget_bytes", "lm_head_weight_grad_block_rows",
                                    "attention_chunk_tokens"])
@pytest.mark.parametrize("value", [0, -4])
def test_non_positive_chunk_raises(option, value):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=option):
        mst.apply(model, **{option: value})
    assert patched_modules(model) == []  # validation happens before anything is patched


@pytest.mark.parametrize("option,value", [
    ("mlp_chunk_tokens", True),  # bool is an int subclass: must not be read as 1 token
    ("lm_head_chunks", False),
    ("mlp_chunks", 2.5),
    ("lm_head_chunk_tokens", "16"),
    ("checkpointing", "no"),  # a non-empty string is truthy
    ("mlp", 1),
    ("lm_head", None),
    ("offload_checkpoints", 0),
    ("mlp_mode", None),
    ("norms", "yes"),
    ("eval_logits", 1),
    ("attention", "yes"),
    ("attention_chunk_tokens", 8.0),
])
def test_option_of_wrong_type_raises_type_error(option, value):
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=option):
        mst.apply(model, **{option: value})
    with pytest.raises(TypeError, match=option):
        mst.MsTOptions(**{option: value})
    assert patched_modules(model) == [] and not model.is_gradient_checkpointing


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


def test_flat_labels_for_one_row_match_vanilla():
    """Labels shaped (S,) for a (1, S) batch: HF shifts along the labels' last dimension and flattens both sides."""
    ref = tiny_model("llama")
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=16)
    ids = make_input_ids(1, 40)
    labels = make_labels(ids, "prefix")
    for shaped in (labels[0], labels.view(2, 20)):  # (S,), and a same-size shape HF accepts as well
        ref.zero_grad()
        got.zero_grad()
        assert_same_step(ref, got, input_ids=ids, labels=shaped)


def test_labels_of_another_size_raise_like_vanilla():
    ref = tiny_model("llama")
    got = mst.apply(clone_model(ref))
    ids = make_input_ids(2, 10)
    with pytest.raises(ValueError):
        ref(input_ids=ids, labels=ids[:, :7])
    with pytest.raises(ValueError, match="labels"):
        got(input_ids=ids, labels=ids[:, :7])


def test_int32_labels_raise_like_vanilla():
    """HF's cross-entropy refuses int32 targets; MsT must not silently differ (it raises the same error)."""
    ref = tiny_model("llama")
    got = mst.apply(clone_model(ref))
    ids = make_input_ids(1, 10)
    with pytest.raises(RuntimeError, match="Long") as expected:
        ref(input_ids=ids, labels=ids.int())
    with pytest.raises(RuntimeError, match="Long") as actual:
        got(input_ids=ids, labels=ids.int())
    assert str(actual.value) == str(expected.value)


@pytest.mark.parametrize("num_items", [0, torch.tensor(0)], ids=["int", "tensor"])
@pytest.mark.parametrize("kind", ["prefix", "none"])  # sum > 0 gives inf, sum = 0 gives nan
def test_zero_num_items_in_batch_matches_vanilla(num_items, kind):
    ref = tiny_model("llama")
    got = mst.apply(clone_model(ref))
    ids = make_input_ids(2, 20)
    labels = make_labels(ids, kind)
    expected = ref(input_ids=ids, labels=labels, num_items_in_batch=num_items).loss
    actual = got(input_ids=ids, labels=labels, num_items_in_batch=num_items).loss
    assert not torch.isfinite(expected)
    torch.testing.assert_close(actual, expected, equal_nan=True)


def test_int_num_items_in_batch_equals_tensor():
    ref, got = tiny_model("llama"), mst.apply(tiny_model("llama"))
    ids = make_input_ids(2, 30)
    labels = make_labels(ids, "prefix")
    assert_same_step(ref, got, input_ids=ids, labels=labels, num_items_in_batch=37)


def test_head_is_plain():
    """Whether the LM head is exactly ``x @ W.T + b``, as the weight-based chunked loss assumes."""
    from torch.nn.modules import module as nn_module

    from mst.integrations.hf import _head_is_plain

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    head = torch.nn.Linear(4, 6)
    assert _head_is_plain(head)
    assert not _head_is_plain(Scaled(4, 6))
    assert not _head_is_plain(torch.nn.Sequential(head))
    for register in (head.register_forward_hook, head.register_forward_pre_hook):
        handle = register(lambda *args: None)
        assert not _head_is_plain(head)
        handle.remove()
        assert _head_is_plain(head)
    # global hooks are observers (ModTracker under measure_peak): the fast path stays
    handle = nn_module.register_module_forward_pre_hook(lambda *args: None)
    assert _head_is_plain(head)
    handle.remove()
    head.forward = lambda x: x
    assert not _head_is_plain(head)


def test_patched_forwards_keep_their_signatures():
    """HF's Trainer reads ``inspect.signature(model.forward)`` (which columns to keep, whether to pass
    ``num_items_in_batch``), and ``generate`` reads it too: the patches must show the class forwards' parameters."""
    import inspect

    ref = tiny_model("llama")
    got = mst.apply(clone_model(ref))
    assert inspect.signature(got.forward) == inspect.signature(ref.forward)
    mlp, mlp_ref = got.model.layers[0].mlp, ref.model.layers[0].mlp
    assert inspect.signature(mlp.forward) == inspect.signature(mlp_ref.forward)


def test_config_edited_after_apply_is_honoured():
    """The softcap is read from the config at each call, as HF's forward does, not frozen at apply time."""
    ref, got = tiny_model("gemma2"), mst.apply(tiny_model("gemma2"), mlp_chunk_tokens=16)
    for model in (ref, got):
        model.config.final_logit_softcapping = 0.3
    ids = make_input_ids(2, 30)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_token_stats_match_the_unpatched_logits(model_type):
    """``mst.apply(token_stats=True)``: with labels the output carries each token's log-sum-exp and argmax of the
    logits HF would have made (Gemma-2: softcapped), and TRL's token accuracy, while logits stay None and the loss
    is unchanged; without the option nothing is attached."""
    ref = tiny_model(model_type)
    got = mst.apply(clone_model(ref), token_stats=True)
    ids = make_input_ids(2, 40)
    labels = make_labels(ids, "prefix")
    out = got(input_ids=ids, labels=labels)
    expected = ref(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, expected.loss)
    assert out.logits is None and "token_stats" not in out.keys()
    logits = expected.logits.float().reshape(-1, expected.logits.shape[-1])
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    stats = out.token_stats
    ran = torch.isfinite(stats.lse)
    assert ran.any()
    torch.testing.assert_close(stats.lse[ran], torch.logsumexp(logits, dim=-1)[ran])
    assert torch.equal(stats.predictions[ran], logits.argmax(dim=-1)[ran])
    valid = shift.reshape(-1) != -100
    torch.testing.assert_close(stats.accuracy(shift),
                               (logits.argmax(dim=-1)[valid] == shift.reshape(-1)[valid]).float().mean())
    assert not hasattr(mst.apply(clone_model(ref))(input_ids=ids, labels=labels), "token_stats")


@pytest.mark.parametrize("features", [dict(label_smoothing=0.1), dict(z_loss=1e-2),
                                      dict(label_smoothing=0.2, z_loss=3e-2)])
@pytest.mark.parametrize("model_type", ["llama", "gemma2", GENERIC_FAMILY])
def test_loss_features_through_apply(model_type, features):
    """``mst.apply(label_smoothing=, z_loss=)``: the loss and every gradient equal plain PyTorch's on the unpatched
    model's logits (F.cross_entropy with label_smoothing, plus z_loss x logsumexp^2 per valid token, mean over
    valid tokens). A family outside the table (GENERIC_FAMILY) passes its apply-time check, run as HF's loss."""
    ref = tiny_model(model_type)
    got = mst.apply(clone_model(ref), **features)
    ids = make_input_ids(2, 40)
    labels = make_labels(ids, "prefix")
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    logits = ref(input_ids=ids).logits.float().reshape(-1, ref.config.vocab_size)
    valid = shift != -100
    per_token = torch.nn.functional.cross_entropy(logits, shift, reduction="none",
                                                  label_smoothing=features.get("label_smoothing", 0.0))
    per_token = per_token + features.get("z_loss", 0.0) * torch.logsumexp(logits, dim=-1).square() * valid
    expected = per_token.sum() / valid.sum()
    expected.backward()
    loss = got(input_ids=ids, labels=labels).loss
    loss.backward()
    assert_exact(loss, expected)
    assert_grads_close(got, ref)


@pytest.mark.parametrize("options, error, message", [
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
    (dict(z_loss=float("nan")), ValueError, "z_loss must be a finite"),
    (dict(z_loss=-1.0), ValueError, "z_loss must be a finite"),
    (dict(z_loss=0.1, lm_head=False), ValueError, "options of mst's LM-head loss"),
    (dict(label_smoothing=True), TypeError, "label_smoothing must be"),
    (dict(class_weights=torch.ones(5)), ValueError, "class_weights must be a tensor of shape"),
    (dict(class_weights=torch.ones(101), z_loss=0.1), ValueError, "cannot be combined"),
])
def test_loss_features_bad_input(options, error, message):
    with pytest.raises(error, match=message):
        mst.apply(tiny_model("llama"), **options)



@pytest.mark.parametrize("model_type", ["llama", GENERIC_FAMILY])
def test_class_weights_through_apply(model_type):
    """``mst.apply(class_weights=w)``: loss and gradients equal ``F.cross_entropy(logits, labels, weight=w)`` on the
    unpatched model's logits (mean over the valid labels' summed weights)."""
    ref = tiny_model(model_type)
    weights = torch.rand(ref.config.vocab_size, generator=torch.Generator().manual_seed(0)) * 2
    got = mst.apply(clone_model(ref), class_weights=weights)
    ids = make_input_ids(2, 40)
    labels = make_labels(ids, "prefix")
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    logits = ref(input_ids=ids).logits.float().reshape(-1, ref.config.vocab_size)
    expected = torch.nn.functional.cross_entropy(logits, shift, weight=weights)
    expected.backward()
    loss = got(input_ids=ids, labels=labels).loss
    loss.backward()
    assert_exact(loss, expected)
    assert_grads_close(got, ref)
