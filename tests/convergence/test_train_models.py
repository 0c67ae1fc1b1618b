"""mst.train.models: seeded presets from mst.configs, local weights only."""
import pytest
import torch

from mst.train import PRESETS, build_model


def test_tiny_preset_is_a_seeded_scaled_llama3_with_gpt2_vocab():
    a, b = build_model("tiny-llama", seed=1), build_model("tiny-llama", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    cfg = a.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (50257, 128, 4, 448)
    assert cfg.eos_token_id == 50256 and not cfg.tie_word_embeddings
    assert 13e6 < sum(p.numel() for p in a.parameters()) < 14e6
    assert a.lm_head.weight.dtype == torch.float32  # the shipped config says bf16; the dtype argument wins
    assert not torch.equal(a.lm_head.weight, build_model("tiny-llama", seed=2).lm_head.weight)


def test_overrides_and_llama3_config():
    m = build_model("tiny-llama", vocab_size=1000, max_position_embeddings=4096, dtype=torch.bfloat16)
    assert m.config.vocab_size == 1000 and m.config.max_position_embeddings == 4096
    assert m.lm_head.weight.dtype == torch.bfloat16
    big = PRESETS["llama3-8b"]()
    assert (big.hidden_size, big.intermediate_size, big.vocab_size) == (4096, 14336, 128256)


def test_weights_from_local_directory_only(tmp_path):
    m = build_model("tiny-llama", vocab_size=1000, seed=3)
    m.save_pretrained(tmp_path)
    loaded = build_model("llama3-8b", weights=tmp_path)  # the preset is ignored when weights are given
    assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_model("llama3-8b", weights="meta-llama/Meta-Llama-3-8B")
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("gpt-5")
