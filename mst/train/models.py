"""Models of the convergence experiments: Llama-3 shapes from ``mst.configs``, seeded, or real local weights.

Presets:
- ``tiny-llama``: ``scaled_config("llama3-8b", 128)`` (head_dim 32, 4 heads / 1 KV head, SwiGLU 448) with 4
  layers and the GPT-2 vocabulary (50,257), untied head: 13.7 M parameters, 12.9 M of them in the embedding and
  LM head; as in a real LLM the vocabulary dominates the LM-head cost. Sized so the CPU default of
  ``experiments/table7`` trains in minutes.
- ``llama3-8b``: Meta-Llama-3-8B's config (``mst/configs/llama3-8b.json``); with ``weights=PATH`` the real
  weights are loaded from a local directory (never downloaded), else it is randomly initialised (memory checks).
Strategies (vanilla / ac / mst / mst_offload) are ``mst.memory.strategies``'.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..configs import load_config, scaled_config

GPT2_EOS = 50256
TINY = dict(num_hidden_layers=4, vocab_size=GPT2_EOS + 1, bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS)
PRESETS = {  # name -> config factory taking overrides
    "tiny-llama": lambda **o: scaled_config("llama3-8b", 128, **{**TINY, **o}),
    "llama3-8b": lambda **o: load_config("llama3-8b", **o),
}


def build_model(preset: str, *, weights: str | Path | None = None, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 0, attn_implementation: str = "sdpa",
                **overrides) -> nn.Module:
    """A Llama ``*ForCausalLM`` from ``preset`` (seeded init: two calls give identical weights; ``overrides`` go
    to the config, e.g. ``vocab_size`` for another tokenizer) or, with ``weights``, from a local HF directory."""
    from transformers import AutoModelForCausalLM

    if weights is not None:
        if not Path(weights).is_dir():
            raise FileNotFoundError(f"--weights {weights}: expected a local HF model directory (nothing is "
                                    "downloaded)")
        model = AutoModelForCausalLM.from_pretrained(weights, local_files_only=True, dtype=dtype,
                                                     attn_implementation=attn_implementation)
    else:
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
        torch.manual_seed(seed)
        with torch.device(device):  # initialise in place: an 8B model never passes through CPU memory
            model = AutoModelForCausalLM.from_config(PRESETS[preset](**overrides), dtype=dtype,
                                                     attn_implementation=attn_implementation)
    return model.to(device)
