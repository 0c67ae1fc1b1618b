"""Which models ``mst.apply`` accepts: the FAMILIES table, shape-generic gated-MLP models outside it, and clear
ValueErrors (naming the supported families) for everything it could not patch exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mst
from mst.integrations import FAMILIES, is_gated_mlp
from tests.utils import GENERIC_FAMILY, assert_same_step, make_input_ids, make_labels, patched_pair, tiny_model


def test_table_lists_the_paper_families():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"} <= set(FAMILIES)


def test_generic_family_is_outside_the_table_and_gated():
    model = tiny_model(GENERIC_FAMILY)
    assert GENERIC_FAMILY not in FAMILIES
    assert all(is_gated_mlp(layer.mlp) for layer in model.model.layers)


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "starcoder2", "phi", "qwen2_moe"])
def test_unsupported_model_raises_naming_families(model_type):
    """No gated dense MLP in (every) decoder layer: GPT-2 / NeoX / StarCoder2 / Phi-1 MLPs, MoE blocks."""
    model = tiny_model(model_type)
    with pytest.raises(ValueError, match="Supported families: .*llama") as err:
        mst.apply(model)
    assert repr(model_type) in str(err.value)
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("model_type,overrides,attr", [
    ("granite", {"logits_scaling": 4.0}, "logits_scaling"),
    ("olmo2", {"final_logit_softcapping": 5.0}, "final_logit_softcapping"),
])
def test_generic_model_with_logit_postprocessing_raises(model_type, overrides, attr):
    """Outside the table, a config that rescales or caps the logits would be silently trained on another loss."""
    with pytest.raises(ValueError, match=attr):
        mst.apply(tiny_model(model_type, **overrides))


def test_generic_model_with_neutral_logit_scaling_is_exact():
    """Granite with logits_scaling=1 is a plain gated-MLP model: accepted through the generic path, exact."""
    ref, got = patched_pair("granite", logits_scaling=1.0)
    ids = make_input_ids(2, 40)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))


def test_cohere_logit_scale_row():
    """Cohere multiplies its logits by config.logit_scale; its FAMILIES row makes the chunked loss do the same."""
    assert tiny_model("cohere").config.logit_scale != 1.0
    ref, got = patched_pair("cohere")
    ids = make_input_ids(2, 40)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))


def test_not_a_causal_lm_raises():
    with pytest.raises(ValueError, match="ForCausalLM"):
        mst.apply(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="ForCausalLM"):
        mst.apply(tiny_model("llama").model)  # the bare decoder has no lm_head


def test_head_without_weight_raises():
    model = tiny_model("llama")
    model.lm_head = nn.Identity()
    with pytest.raises(ValueError, match="lm_head=False"):
        mst.apply(model)
    mst.apply(model, lm_head=False)  # the MLP part alone is still possible
    with torch.no_grad():
        model.eval()(input_ids=make_input_ids(1, 5))
