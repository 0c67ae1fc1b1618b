"""Which models ``mst.apply`` accepts: the FAMILIES table, shape-generic gated-MLP models outside it (checked at
apply time against their own loss), and clear ValueErrors (naming the supported families) for everything it could
not patch exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

import mst
from mst.integrations import FAMILIES, is_gated_mlp, is_tokenwise_mlp, options_dict
from tests.utils import (GENERIC_FAMILY, MLP_CHUNK, TEXT_VOCAB, assert_same_step, clone_model, make_input_ids,
                         make_labels, patched_pair, tiny_config, tiny_model, tiny_multimodal_model)


def test_table_lists_the_paper_families():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"} <= set(FAMILIES)


def test_generic_family_is_outside_the_table_and_gated():
    model = tiny_model(GENERIC_FAMILY)
    assert GENERIC_FAMILY not in FAMILIES
    assert all(is_gated_mlp(layer.mlp) for layer in model.model.layers)


@pytest.mark.parametrize("model_type", ["gpt2", "qwen2_moe"])
def test_unsupported_model_raises_naming_families(model_type):
    """No dense token-wise MLP at .mlp of the decoder's layers: GPT-2 (layers at ``h``), MoE blocks."""
    model = tiny_model(model_type)
    with pytest.raises(ValueError, match="Supported families: .*llama") as err:
        mst.apply(model)
    assert repr(model_type) in str(err.value)
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("model_type,overrides,attr", [
    ("olmo2", {"logits_scaling": 4.0}, "logits_scaling"),  # the attribute Granite divides by
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


class ScaledLogitsConfig(LlamaConfig):
    model_type = "mst_test_scaled_logits"


class ScaledLogitsForCausalLM(LlamaForCausalLM):
    """A family outside the table that multiplies its logits by a config attribute no list knows (as muP models do
    with e.g. ``logits_mup_width_multiplier``), and draws a random number in every forward (as noisy models do)."""

    config_class = ScaledLogitsConfig

    def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
        torch.rand(1)
        out = super().forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
        logits = out.logits * self.config.logits_mup_width_multiplier
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


def scaled_logits_model(multiplier: float) -> ScaledLogitsForCausalLM:
    torch.manual_seed(0)
    base = {k: v for k, v in tiny_config("llama").to_dict().items() if k != "model_type"}
    cfg = ScaledLogitsConfig(**base, logits_mup_width_multiplier=multiplier)
    return ScaledLogitsForCausalLM(cfg).train()


def model_state(model) -> dict:
    """What a refused or checked apply must leave as it was: forwards, modes, checkpointing, gradients, RNG."""
    return {"patched": [n for n, m in model.named_modules() if "forward" in m.__dict__],
            "training": [m.training for m in model.modules()],
            "checkpointing": model.is_gradient_checkpointing,
            "grads": [p.grad for p in model.parameters() if p.grad is not None],
            "options": getattr(model, "mst_options", None),
            "rng": torch.get_rng_state()}


def test_unknown_family_with_unlisted_logit_scaling_is_refused():
    """The generic path checks itself at apply time against the model's own loss on a few tokens."""
    model = scaled_logits_model(4.0)
    model.model.layers[0].eval()  # a mixed train/eval state must come back as it was
    before = model_state(model)
    with pytest.raises(ValueError, match="mst_test_scaled_logits.*does not reproduce"):
        mst.apply(model)
    after = model_state(model)
    assert torch.equal(after.pop("rng"), before.pop("rng"))
    assert after == before


def test_unknown_family_is_checked_on_mst_loss_also_with_eval_logits():
    """eval_logits=True runs HF's forward under no_grad; the apply-time check must still compare mst's loss."""
    with pytest.raises(ValueError, match="does not reproduce"):
        mst.apply(scaled_logits_model(4.0), eval_logits=True)


def test_unknown_family_that_checks_out_is_exact():
    model = scaled_logits_model(1.0)
    before = model_state(model)
    got = mst.apply(clone_model(model), mlp_chunk_tokens=MLP_CHUNK)
    mst.apply(model)  # the check itself leaves no trace: no RNG draw, no gradient, modes restored
    after = model_state(model)
    assert torch.equal(after.pop("rng"), before.pop("rng"))
    assert after["grads"] == [] and after["training"] == before["training"]
    ids = make_input_ids(2, 40)
    assert_same_step(scaled_logits_model(1.0), got, input_ids=ids, labels=make_labels(ids, "prefix"))


def test_refused_reapply_keeps_the_previous_patch():
    model = mst.apply(scaled_logits_model(4.0), lm_head=False)  # MLPs only: HF still makes the logits
    with pytest.raises(ValueError, match="does not reproduce"):
        mst.apply(model)
    assert options_dict(model)["lm_head"] is False
    assert [n for n, m in model.named_modules() if "forward" in m.__dict__] == ["model.layers.0.mlp",
                                                                                "model.layers.1.mlp"]
    assert model.is_gradient_checkpointing


def test_generic_multimodal_reads_post_processing_from_the_text_config():
    """The post-processing attributes are read from the nested text config too, not only the top-level config."""
    model = tiny_multimodal_model("llava", text_type=GENERIC_FAMILY, final_logit_softcapping=1.0)
    assert getattr(model.config, "final_logit_softcapping", None) is None
    with pytest.raises(ValueError, match="'llava'.*final_logit_softcapping"):
        mst.apply(model)


def test_generic_multimodal_is_checked_and_exact():
    """A wrapper whose language model is outside the table too (Llava over OLMo-2) goes the generic, checked way."""
    ref = tiny_multimodal_model("llava", text_type=GENERIC_FAMILY)
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=MLP_CHUNK)
    ref.model.vision_tower.requires_grad_(False)  # text only: the vision side gets no gradient, in both alike
    got.model.vision_tower.requires_grad_(False)
    ref.model.multi_modal_projector.requires_grad_(False)
    got.model.multi_modal_projector.requires_grad_(False)
    ids = make_input_ids(2, 40, TEXT_VOCAB)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))


def test_wrapper_that_ignores_its_text_rows_softcap_is_refused():
    """Gemma-3's multimodal forward does not apply ``text_config.final_logit_softcapping`` (Gemma-3 sets none),
    while the Gemma-3 text row would: the apply-time check catches what the row cannot know."""
    model = tiny_multimodal_model("gemma3", final_logit_softcapping=1.0)
    with pytest.raises(ValueError, match="'gemma3'.*does not reproduce"):
        mst.apply(model)
    assert [n for n, m in model.named_modules() if "forward" in m.__dict__] == []


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_facts_match_the_hf_modules(model_type):
    """The planner's columns of each row against the family's own HF modules (tiny model, config-class defaults):
    a wrong row would make the memory planner model another layer than the one ``mst.apply`` patches."""
    row = FAMILIES[model_type]
    overrides = {"use_qk_norm": True} if isinstance(row.qk_norm, str) else {}  # a flag: check the modules it adds
    model = tiny_model(model_type, **overrides)
    layer, attn, mlp = model.model.layers[0], model.model.layers[0].self_attn, model.model.layers[0].mlp
    norms = [module for name, module in layer.named_children() if "norm" in name]
    assert len(norms) == row.norms_per_layer
    assert row.parallel_block == (not hasattr(layer, "post_attention_layernorm"))
    kinds = {"layer" if type(n).__name__.endswith("LayerNorm")
             else "gemma" if bool((n.weight == 0).all()) else "rms" for n in norms}  # Gemma's (1 + w): w = 0
    assert kinds == {row.norm}
    assert row.fused_qkv == hasattr(attn, "qkv_proj") != hasattr(attn, "q_proj")
    assert row.fused_gate_up == hasattr(mlp, "gate_up_proj") != hasattr(mlp, "gate_proj")
    assert bool(row.qk_norm) == hasattr(attn, "q_norm") == hasattr(attn, "k_norm")
    assert not row.qk_norm_interleaved or row.qk_norm is True
    q = attn.qkv_proj if row.fused_qkv else attn.q_proj
    assert row.qkv_bias == (q.bias is not None)  # the config class's attention_bias default is off
    assert row.embed_scale == hasattr(model.model.embed_tokens, "embed_scale")
    assert row.tied_embeddings == AutoConfig.for_model(model_type).tie_word_embeddings
    assert not (row.rope_fp32 or row.rope_cat) or model_type in ("cohere", "phi3")  # read off their RoPE code


def test_planner_covers_every_family_apply_supports():
    """Each row is planned (both engines read ``ModelSpec.from_config``); the planner has no table of its own."""
    from mst.memory.planner import ModelSpec

    for model_type in FAMILIES:
        assert ModelSpec.from_config(tiny_config(model_type)).model_type == model_type


def test_mllama_text_decoder_found_at_model_and_exact():
    """transformers 5.x's ``MllamaForCausalLM.get_decoder()`` returns the model itself; its decoder is ``.model``
    (self-attention and cross-attention layers, each with a gated MLP). Was refused as "no dense gated MLP"."""
    from transformers import MllamaForCausalLM
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig

    torch.manual_seed(0)
    config = MllamaTextConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ref = MllamaForCausalLM(config).train()
    assert ref.get_decoder() is ref  # the transformers behaviour this test is about
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=MLP_CHUNK)
    assert "forward" in got.model.layers[0].mlp.__dict__ and "forward" in got.model.layers[1].mlp.__dict__
    for model in (ref, got):  # text only: the cross-attention layer is skipped without images, in both alike
        model.model.layers[1].requires_grad_(False)
    ids = make_input_ids(2, 40)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))



@pytest.mark.parametrize("norms", [False, True])
@pytest.mark.parametrize("model_type", ["phi", "starcoder2", "gpt_neox"])
def test_plain_mlp_families_are_checked_and_exact(model_type, norms):
    """MLPs without a gate (Phi's fc1/fc2, StarCoder2's c_fc/c_proj, GPT-NeoX's dense_h_to_4h/dense_4h_to_h) are
    token-wise too: the generic, checked path, loss and every gradient equal the unpatched model's (also with the
    hidden-state norms in mini-sequences)."""
    ref = tiny_model(model_type)
    layers = ref.get_decoder().layers
    assert model_type not in FAMILIES and all(is_tokenwise_mlp(layer.mlp) for layer in layers)
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=MLP_CHUNK, norms=norms)
    assert all("forward" in layer.mlp.__dict__ for layer in got.get_decoder().layers)
    ids = make_input_ids(2, 40)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))
