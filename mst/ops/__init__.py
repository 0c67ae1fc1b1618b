"""Pure PyTorch autograd functions of MsT (no transformers import): the mini-sequence MLP, the chunked LM-head +
cross-entropy from the head's weight, the same loss through the head module itself (adapters, hooks), and attention
by query chunks."""
from .chunked_lm_head_loss import (BlockedWeightGradLMHeadLoss, PerTokenLMHeadLoss, SummedLMHeadLoss,
                                   chunked_lm_head_loss)
from .chunked_module_lm_head_loss import ChunkedModuleLMHeadLossFunction, chunked_module_lm_head_loss
from .lm_head_common import TokenStats, lm_head_chunk_tokens
from .mini_sequence_attention import (ATTENTION_BACKENDS, AttentionSpec, MiniSequenceAttentionFunction,
                                     default_attention_chunk_tokens, mini_sequence_attention)
from .mini_sequence_mlp import (MiniSequenceMLPFunction, default_mlp_chunk_tokens, mini_sequence_mlp,
                                resolve_chunk_tokens)

__all__ = ["BlockedWeightGradLMHeadLoss", "PerTokenLMHeadLoss", "SummedLMHeadLoss", "chunked_lm_head_loss",
           "lm_head_chunk_tokens", "TokenStats", "ChunkedModuleLMHeadLossFunction", "chunked_module_lm_head_loss",
           "ATTENTION_BACKENDS", "AttentionSpec", "MiniSequenceAttentionFunction", "default_attention_chunk_tokens",
           "mini_sequence_attention", "MiniSequenceMLPFunction", "default_mlp_chunk_tokens", "mini_sequence_mlp",
           "resolve_chunk_tokens"]
