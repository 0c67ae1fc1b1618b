"""Public model configs used by the planner and the experiments, shipped as JSON (no hub access at run time).

Each ``<name>.json`` is the model's public Hugging Face ``config.json`` (the ``_source`` key says which one), so
``load_config`` gives exactly the shapes the paper trained: layers, heads, KV heads, head_dim, vocabulary, tied
embeddings, final-logit softcapping, rope settings, RMSNorm eps and max positions.

    cfg = load_config("llama3-8b")                 # transformers.LlamaConfig, d=4096, V=128256, ...
    small = scaled_config("llama3-8b", 256)        # same L, V/d, I/d and GQA ratio, for CPU experiments
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

CONFIG_DIR = Path(__file__).resolve().parent
MODELS = ("llama3-8b", "llama2-7b", "mistral-7b", "qwen2-7b", "gemma2-9b")
SCALED_HEAD_DIM = 32


def _raw(name: str) -> dict:
    if name not in MODELS:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(MODELS)}")
    with open(CONFIG_DIR / f"{name}.json") as f:
        raw = json.load(f)
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def load_config(name: str, **overrides) -> PretrainedConfig:
    """The HF config of a shipped model (``MODELS``); ``overrides`` replace config.json values.

    Unknown names raise ValueError listing the known ones.
    """
    raw = {**_raw(name), **overrides}
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def _round8(x: float) -> int:
    return max(8, int(round(x / 8)) * 8)


def scaled_config(name: str, hidden_size: int, **overrides) -> PretrainedConfig:
    """A scaled-down config of ``name`` with hidden size ``hidden_size``, for CPU max-length experiments.

    Scaling rule (why: the vanilla : AC : MsT length ratios depend on L, V/d, I/d and the GQA ratio, not on d):
      - num_hidden_layers is kept (checkpoint memory grows with L);
      - intermediate_size and vocab_size are multiplied by hidden_size / d_full and rounded to a multiple of 8
        (keeps I/d and V/d);
      - head_dim is 32, heads = hidden_size / 32, KV heads = heads / (orig heads / orig KV heads), at least 1
        and a divisor of heads (keeps the GQA grouping, hence the K/V to Q size ratio);
      - Gemma-2's ``query_pre_attn_scalar`` (= head_dim in the original) follows the new head_dim;
      - everything else (tied embeddings, softcapping, rope, eps, sliding window in tokens) is kept.
    ``overrides`` are applied last and win (e.g. ``num_hidden_layers=2`` for a quick test).
    """
    if not isinstance(hidden_size, int) or hidden_size <= 0 or hidden_size % SCALED_HEAD_DIM:
        raise ValueError(f"hidden_size must be a positive multiple of {SCALED_HEAD_DIM}, got {hidden_size!r}")
    raw = _raw(name)
    scale = hidden_size / raw["hidden_size"]
    heads = hidden_size // SCALED_HEAD_DIM
    group = raw["num_attention_heads"] // raw.get("num_key_value_heads", raw["num_attention_heads"])
    kv_heads = max(1, heads // group)
    while heads % kv_heads:
        kv_heads -= 1
    raw.update(hidden_size=hidden_size, intermediate_size=_round8(raw["intermediate_size"] * scale),
               vocab_size=_round8(raw["vocab_size"] * scale), num_attention_heads=heads,
               num_key_value_heads=kv_heads, head_dim=SCALED_HEAD_DIM)
    if "query_pre_attn_scalar" in raw:
        raw["query_pre_attn_scalar"] = SCALED_HEAD_DIM
    for token_id in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids must stay inside the smaller vocab
        if isinstance(raw.get(token_id), int) and raw[token_id] >= raw["vocab_size"]:
            raw[token_id] = raw["vocab_size"] - 1
    raw.update(overrides)
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


__all__ = ["MODELS", "load_config", "scaled_config"]
