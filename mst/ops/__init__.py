"""Pure PyTorch autograd functions of MsT (no transformers import): the mini-sequence MLP and the chunked
LM-head + cross-entropy."""
from .chunked_lm_head_loss import ChunkedLMHeadLossFunction, chunked_lm_head_loss, lm_head_chunk_tokens
from .mini_sequence_mlp import (MiniSequenceMLPFunction, default_mlp_chunk_tokens, mini_sequence_mlp,
                                resolve_chunk_tokens)

__all__ = ["ChunkedLMHeadLossFunction", "chunked_lm_head_loss", "lm_head_chunk_tokens",
           "MiniSequenceMLPFunction", "default_mlp_chunk_tokens", "mini_sequence_mlp", "resolve_chunk_tokens"]
