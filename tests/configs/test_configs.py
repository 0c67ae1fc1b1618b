"""Shipped model configs: the public HF values (docs/paper.md's key dimensions), clear errors, and the scaling rule of
``scaled_config`` (same L, V/d and I/d within rounding, GQA grouping kept, head_dim 32, usable by HF)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mst.configs import MODELS, load_config, scaled_config

# d, I, V, L, heads, kv heads, head_dim, tied, final softcap  (docs/paper.md "Model hyper-parameters")
EXPECTED = {
    "llama3-8b": (4096, 14336, 128256, 32, 32, 8, 128, False, None),
    "llama2-7b": (4096, 11008, 32000, 32, 32, 32, 128, False, None),
    "mistral-7b": (4096, 14336, 32000, 32, 32, 8, 128, False, None),
    "qwen2-7b": (3584, 18944, 152064, 28, 28, 4, 128, False, None),
    "gemma2-9b": (3584, 14336, 256000, 42, 16, 8, 256, True, 30.0),
}


def _dims(cfg):
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, head_dim, cfg.tie_word_embeddings, getattr(cfg, "final_logit_softcapping", None))


@pytest.mark.parametrize("name", MODELS)
def test_load_config_matches_public_values(name):
    cfg = load_config(name)
    assert _dims(cfg) == EXPECTED[name]
    assert cfg.rope_parameters["rope_theta"] > 0 and cfg.rms_norm_eps > 0 and cfg.max_position_embeddings >= 4096


def test_rope_and_overrides():
    assert load_config("llama3-8b").rope_parameters["rope_theta"] == 500000.0
    assert load_config("qwen2-7b").rope_parameters["rope_theta"] == 1000000.0
    assert load_config("llama3-8b", num_hidden_layers=2).num_hidden_layers == 2


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="llama3-8b.*gemma2-9b"):
        load_config("llama4-400b")


@pytest.mark.parametrize("name", MODELS)
def test_scaled_config_keeps_ratios(name):
    full, small = load_config(name), scaled_config(name, 256)
    assert small.hidden_size == 256 and small.num_hidden_layers == full.num_hidden_layers
    assert small.intermediate_size % 8 == 0 and small.vocab_size % 8 == 0
    for attr in ("intermediate_size", "vocab_size"):
        ratio_full, ratio_small = getattr(full, attr) / full.hidden_size, getattr(small, attr) / 256
        assert abs(ratio_small - ratio_full) <= 4 / 256 + 1e-9, attr  # within the rounding to a multiple of 8
    group = full.num_attention_heads // full.num_key_value_heads
    assert small.head_dim == 32 and small.num_attention_heads == 8
    assert small.num_key_value_heads == max(1, 8 // group)
    assert small.tie_word_embeddings == full.tie_word_embeddings


@pytest.mark.parametrize("name", MODELS)
def test_scaled_model_builds_and_runs(name):
    cfg = scaled_config(name, 64, num_hidden_layers=1)
    model = AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("hidden", [0, 48, 100, "64"])
def test_scaled_config_rejects_bad_hidden(hidden):
    with pytest.raises(ValueError, match="multiple of 32"):
        scaled_config("llama3-8b", hidden)
