"""Large-index safety of every chunked op (issue: at d = 4096, S >= 524,288 puts S x d past 2^31 elements, where
int32-indexed kernels fail: Liger-Kernel issue 803, flash-attention 2).

Allocating such shapes needs tens of GB, more than CI has, so this checks the chunk arithmetic that guarantees it:
for every bundled full-size config, up to 4M tokens, the largest tensor each op makes per chunk with its default
chunking stays below 2^31 elements. What stays full-sequence (the hidden states, Q, K, V and their gradients) is
listed in README "Large-index safety" with the kernels that see it.
"""
from __future__ import annotations

import pytest

from mst.configs import MODELS, load_config
from mst.ops import default_attention_chunk_tokens, default_mlp_chunk_tokens, lm_head_chunk_tokens
from mst.ops.lm_head_common import MAX_CHUNK_ELEMENTS

LENGTHS = [524_288, 1 << 20, 1 << 22]


@pytest.mark.parametrize("tokens", LENGTHS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_chunks_stay_below_two_to_the_31(name, tokens):
    cfg = load_config(name)
    d, vocab = cfg.hidden_size, cfg.vocab_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    # MLP: a chunk's gate / up / act * up intermediates (C x I)
    assert default_mlp_chunk_tokens(d) * cfg.intermediate_size <= MAX_CHUNK_ELEMENTS
    # LM head + loss: a chunk's fp32 logits (C x V)
    assert lm_head_chunk_tokens(tokens, vocab, d) * vocab <= MAX_CHUNK_ELEMENTS
    # attention: the math path's scores (H x C x Sk), the CPU SDPA path's boolean mask (C x Sk), the CUDA flash
    # path's query chunk and output (C x H x D); the K / V a chunk sees are full-length (Sk x Hkv x D)
    math_chunk = default_attention_chunk_tokens(1, heads, head_dim, tokens, "math", cuda=False)
    assert heads * math_chunk * tokens <= MAX_CHUNK_ELEMENTS or math_chunk == 1
    assert default_attention_chunk_tokens(1, heads, head_dim, tokens, "sdpa", cuda=False) * tokens \
        <= MAX_CHUNK_ELEMENTS
    assert default_attention_chunk_tokens(1, heads, head_dim, tokens, "sdpa", cuda=True) * heads * head_dim \
        <= MAX_CHUNK_ELEMENTS
