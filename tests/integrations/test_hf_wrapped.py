"""mst.apply on models that are not a bare ``*ForCausalLM``: a ``torch.compile`` wrapper (patched through to the
module it compiles) and multimodal ``*ForConditionalGeneration`` wrappers (their text config and language model;
the vision tower is left as it is). Exactness as everywhere: loss and every gradient equal the unpatched model's."""
from __future__ import annotations

import pytest
import torch

import mst
from tests.utils import (IMAGE_TOKEN, IMAGE_TOKENS_PER_IMAGE, MLP_CHUNK, MULTIMODAL_TYPES, NORM_RTOL, TEXT_VOCAB,
                         TINY_VISION, assert_exact, assert_grads_close, assert_same_step, clone_model, make_input_ids,
                         make_labels, rel_err, tiny_model, tiny_multimodal_model)


def patched_modules(model) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


def assert_same_multimodal_step(ref, got, **batch) -> None:
    """``assert_same_step`` for a wrapper: the vision side (tower and projector) may get no gradient (no image, or a
    CLIP class token / SigLIP head the projector does not read), in both models alike; the gradients it gets are
    compared as one vector (``NORM_RTOL``), since some parameters' are zero up to rounding (a key bias does not
    change a softmax), which no per-parameter relative error can judge."""
    losses = []
    for model in (ref, got):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    assert_exact(losses[1], losses[0], "loss")
    vision_ref, vision_got = [], []
    for (name, expected), actual in zip(ref.named_parameters(), got.parameters()):
        assert (expected.grad is None) == (actual.grad is None), name
        vision = "vision_tower" in name or "multi_modal_projector" in name
        if expected.grad is None:
            assert vision, f"{name}: no gradient"
        elif vision:
            vision_ref.append(expected.grad.flatten())
            vision_got.append(actual.grad.flatten())
        else:
            assert_exact(actual.grad, expected.grad, f"grad of {name}")
    if vision_ref:
        assert rel_err(torch.cat(vision_got), torch.cat(vision_ref)) <= NORM_RTOL


def test_compiled_model_is_patched_through():
    ref = tiny_model("llama")
    compiled = torch.compile(clone_model(ref), backend="eager")
    assert mst.apply(compiled, mlp_chunk_tokens=MLP_CHUNK) is compiled  # the wrapper is kept, and works
    assert compiled._orig_mod.mst_options.mlp_chunk_tokens == MLP_CHUNK
    ids = make_input_ids(2, 2 * MLP_CHUNK + 3)
    labels = make_labels(ids, "prefix")
    out = compiled(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    expected = ref(input_ids=ids, labels=labels).loss
    expected.backward()
    torch.testing.assert_close(out.loss, expected)
    assert_grads_close(compiled._orig_mod, ref)
    assert mst.revert(compiled) is compiled and patched_modules(compiled._orig_mod) == []
    assert compiled(input_ids=ids, labels=labels).logits is not None


def test_compiled_model_run_before_apply():
    """A wrapper that already compiled the vanilla forward must run the patch after apply, not a stale graph."""
    ref = tiny_model("llama")
    compiled = torch.compile(clone_model(ref), backend="eager")
    ids = make_input_ids(1, 20)
    assert compiled(input_ids=ids, labels=ids).logits is not None
    mst.apply(compiled)
    assert compiled(input_ids=ids, labels=ids).logits is None
    mst.revert(compiled)
    assert compiled(input_ids=ids, labels=ids).logits is not None


def test_module_compile_in_place():
    ref = tiny_model("qwen3")
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=MLP_CHUNK)
    got.compile(backend="eager")
    ids = make_input_ids(2, 40)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))


@pytest.mark.parametrize("model_type", MULTIMODAL_TYPES)
def test_multimodal_text_only_is_exact(model_type):
    ref = tiny_multimodal_model(model_type)
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=MLP_CHUNK)
    n_layers = ref.config.get_text_config().num_hidden_layers
    assert len(patched_modules(got)) == 1 + n_layers  # the wrapper's forward and the language model's MLPs
    ids = make_input_ids(2, 2 * MLP_CHUNK + 3, TEXT_VOCAB)
    assert_same_multimodal_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))


@pytest.mark.parametrize("model_type", MULTIMODAL_TYPES)
def test_multimodal_with_image_is_exact(model_type):
    """Image features are merged before the language model, so the chunked LM head sees the same hidden states."""
    ref = tiny_multimodal_model(model_type)
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=MLP_CHUNK)
    ids = make_input_ids(2, 30, TEXT_VOCAB)
    ids[:, :IMAGE_TOKENS_PER_IMAGE] = IMAGE_TOKEN
    labels = make_labels(ids, "prefix")
    size = TINY_VISION["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    assert_same_multimodal_step(ref, got, input_ids=ids, pixel_values=pixels, labels=labels)


def test_paligemma2_softcap_from_text_config():
    """PaliGemma-2 caps its logits with ``text_config.final_logit_softcapping`` (there is none at the top level)."""
    ref = tiny_multimodal_model("paligemma", final_logit_softcapping=0.5)
    assert getattr(ref.config, "final_logit_softcapping", None) is None
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=MLP_CHUNK)
    ids = make_input_ids(2, 40, TEXT_VOCAB)
    assert_same_multimodal_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))


def test_multimodal_generate_after_apply():
    ref = tiny_multimodal_model("gemma3").eval()
    got = mst.apply(clone_model(ref)).eval()
    prompt = make_input_ids(1, 12, TEXT_VOCAB)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got.generate(prompt, **kwargs), ref.generate(prompt, **kwargs), rtol=0, atol=0)
