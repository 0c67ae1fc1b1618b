"""experiments.models: the one model builder (seeded, local weights only, attention chosen by device), the Table 7
presets, and the per-experiment configs (scaled on CPU, full size on CUDA)."""
import pytest
import torch

from experiments.models import PRESETS, attention_implementation, build_model, model_config, preset_config


def tiny(**overrides):
    return preset_config("tiny-llama", **overrides)


def test_tiny_preset_is_a_seeded_scaled_llama3_with_gpt2_vocab():
    a, b = build_model(tiny(), seed=1), build_model(tiny(), seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    cfg = a.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (50257, 128, 4, 448)
    assert cfg.eos_token_id == 50256 and not cfg.tie_word_embeddings
    assert 13e6 < sum(p.numel() for p in a.parameters()) < 14e6
    assert a.lm_head.weight.dtype == torch.float32  # the shipped config says bf16; the dtype argument wins
    assert not torch.equal(a.lm_head.weight, build_model(tiny(), seed=2).lm_head.weight)


def test_overrides_and_llama3_config():
    m = build_model(tiny(vocab_size=1000, max_position_embeddings=4096), dtype=torch.bfloat16)
    assert m.config.vocab_size == 1000 and m.config.max_position_embeddings == 4096
    assert m.lm_head.weight.dtype == torch.bfloat16
    big = PRESETS["llama3-8b"]()
    assert (big.hidden_size, big.intermediate_size, big.vocab_size) == (4096, 14336, 128256)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_config("gpt-5")


def test_weights_from_local_directory_only(tmp_path):
    m = build_model(tiny(vocab_size=1000), seed=3)
    m.save_pretrained(tmp_path)
    loaded = build_model(None, weights=tmp_path)
    assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_model(None, weights="meta-llama/Meta-Llama-3-8B")


def test_attention_sdpa_on_cpu_and_the_configs_own():
    assert attention_implementation("cpu") == "sdpa"
    assert build_model(tiny(num_hidden_layers=1)).config._attn_implementation == "sdpa"
    gemma = model_config("gemma2-9b", "cpu", hidden=32, layers=1)  # flash-equivalent attention on CPU
    assert build_model(gemma).config._attn_implementation == gemma._attn_implementation_internal != "sdpa"


def test_model_config_layers_override():
    """No layers: the model's own layer count; layers=N: N (``is not None``, not truthiness)."""
    full = PRESETS["llama3-8b"]().num_hidden_layers
    assert model_config("llama3-8b", "cpu", hidden=32).num_hidden_layers == full
    assert model_config("gemma2-9b", "cpu", hidden=32, layers=1).num_hidden_layers == 1
    assert model_config("llama3-8b", "cpu", hidden=32).hidden_size == 32
