"""The one model builder of the experiments, and the configs they train.

- ``model_config``: the full-size public config on CUDA; on CPU the scaled one (``mst.configs.scaled_config``: same
  layer count, V/d, I/d and GQA, hidden d_s instead of d), with flash-equivalent attention where HF's CPU paths
  would build S x S tensors that FlashAttention does not (Gemma-2's attention softcap and sliding windows).
- ``build_model``: seeded random init in place on the device (an 8B model never passes through CPU memory) or local
  weights (never downloaded); FlashAttention-2 where flash-attn is installed and the model runs on CUDA (the
  paper's kernel), PyTorch SDPA otherwise.
- ``preset_config``: Table 7's models: ``tiny-llama`` is ``scaled_config("llama3-8b", 128)`` (head_dim 32, 4 heads
  / 1 KV head, SwiGLU 448) with 4 layers and the GPT-2 vocabulary (50,257), untied head: 13.7 M parameters, 12.9 M
  of them in the embedding and LM head, so as in a real LLM the vocabulary dominates the LM-head cost; sized so the
  CPU default of ``experiments/table7`` trains in minutes. ``llama3-8b`` is Meta-Llama-3-8B's config.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from mst.configs import load_config, scaled_config
from mst.memory.planner.traced import flash_equivalent

GPT2_EOS = 50256
TINY = dict(num_hidden_layers=4, vocab_size=GPT2_EOS + 1, bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS)
PRESETS = {  # name -> config factory taking overrides
    "tiny-llama": lambda **o: scaled_config("llama3-8b", 128, **{**TINY, **o}),
    "llama3-8b": lambda **o: load_config("llama3-8b", **o),
}


def preset_config(preset: str, **overrides) -> PretrainedConfig:
    """The config of a Table 7 preset (``overrides`` go to the config, e.g. ``vocab_size`` for another tokenizer)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset](**overrides)


def model_config(name: str, device: str | torch.device = "cpu", hidden: int = 128, layers: int | None = None,
                 **overrides) -> PretrainedConfig:
    """``name``'s config at full size on CUDA, scaled to ``hidden`` (and ``layers``, smoke runs only) on CPU."""
    if torch.device(device).type == "cuda":
        return load_config(name, **overrides)
    config = scaled_config(name, hidden_size=hidden, **({} if layers is None else {"num_hidden_layers": layers}),
                           **overrides)
    if getattr(config, "attn_logit_softcapping", None):
        # HF has no SDPA path for Gemma-2's attention softcap: eager attention, or SDPA with its S x S masks,
        # materialises S x S tensors on CPU, while flash-attn on a GPU applies the cap and the windows inside the
        # kernel. The CPU runs measure memory, not values, so they use the planner's flash-equivalent attention.
        config = flash_equivalent(config)
    return config


def attention_implementation(device: str | torch.device) -> str:
    """"flash_attention_2" where flash-attn is installed and the model runs on CUDA, else "sdpa"."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_model(config: PretrainedConfig | None, *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, weights: str | Path | None = None, seed: int = 0,
                attn_implementation: str | None = None) -> nn.Module:
    """A ``*ForCausalLM`` of ``config``, seeded (two calls give identical weights), or from the local HF directory
    ``weights``. Attention: ``attn_implementation``, else one the config already names (``flash_equivalent``),
    else ``attention_implementation(device)``."""
    from transformers import AutoModelForCausalLM

    attention = attn_implementation or getattr(config, "_attn_implementation_internal", None) \
        or attention_implementation(device)
    if weights is not None:
        if not Path(weights).is_dir():
            raise FileNotFoundError(f"--weights {weights}: expected a local HF model directory (nothing is "
                                    "downloaded)")
        model = AutoModelForCausalLM.from_pretrained(weights, local_files_only=True, dtype=dtype,
                                                     attn_implementation=attention)
        return model.to(device)
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
