"""DeepSpeed-Ulysses attention for HF models (MsT paper Sec 3.5 / Fig 2), routed per attention module.

Each rank holds a contiguous slice of the sequence. Around every attention call, DeepSpeed's
``UlyssesSPAttentionHF`` all-to-alls Q, K, V from "local sequence, all heads" to "full sequence, H / sp heads",
runs the model's own core attention (sdpa / flash / flex), and all-to-alls the output back. Everything else in the
decoder (norms, rotary, the mini-sequence MLP, the chunked LM-head) is token-wise and runs on the local shard.

How it is hooked: through the attention registry (``mst.distributed.routing``), with DeepSpeed's wrapper built
around the model's own core attention function; DeepSpeed's global sequence-parallel state
(``parallel_state_sp``) is left untouched, so several models and groups can coexist.

Requirements (``validate``): heads % sp == 0 and (kv_heads % sp == 0 or sp % kv_heads == 0, then kv heads are
replicated, as in DeepSpeed). Attention masks are
dropped (causality comes from the gathered global ``position_ids``), so ``eager`` attention, padding masks and
packed sequences are not supported; ``mst.distributed.shard_batch`` enforces that on the data side.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..integrations.attention import MINI_SEQUENCE_ATTENTION
from .routing import route

# core attention implementations Ulysses can wrap (eager needs a 4-D S x S mask, which SP cannot shard)
SUPPORTED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", MINI_SEQUENCE_ATTENTION)


def validate(config: Any, sp_size: int) -> None:
    """Raise ``ValueError`` unless the heads of ``config`` split over ``sp_size`` ranks (DeepSpeed's rule)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if heads % sp_size:
        raise ValueError(f"Ulysses needs the attention head count divisible by the SP size: "
                         f"num_attention_heads={heads} is not divisible by sp_size={sp_size}")
    if kv % sp_size and sp_size % kv:
        raise ValueError(f"Ulysses needs num_key_value_heads divisible by the SP size, or the SP size divisible by "
                         f"it (kv heads are then replicated): num_key_value_heads={kv}, sp_size={sp_size}")


def init_deepspeed_comm(dist_backend: str) -> None:
    """Initialise ``deepspeed.comm`` on top of the already-initialised ``torch.distributed`` (needed by Ulysses);
    ``dist_backend`` is its process-group backend ("gloo", "nccl").

    On the CPU accelerator ``deepspeed.init_distributed`` would JIT-compile a shared-memory all-reduce op with g++
    (~80 s, docs/environment.md §2); Ulysses only needs all-to-all / all-gather, so that op is disabled first.
    """
    import deepspeed
    import deepspeed.comm
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist_backend)


class UlyssesAttention:
    """Per-model Ulysses wrapper around one core attention function; a plain object, not an ``nn.Module``.

    DeepSpeed's ``UlyssesSPAttentionHF`` is built for one micro-batch size; one instance is kept per batch size
    seen (the sequence length may vary: ``seq_length_is_variable=True``).
    """

    def __init__(self, core_attention: Callable, config: Any, group: Any) -> None:
        self.core_attention = core_attention
        self.config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.group = group
        self._by_batch: dict[int, nn.Module] = {}

    def _instance(self, batch_size: int) -> nn.Module:
        if batch_size not in self._by_batch:
            from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

            cfg = self.config
            self._by_batch[batch_size] = UlyssesSPAttentionHF(
                attn=self.core_attention, batch_size=batch_size, attn_head_count=cfg.num_attention_heads,
                attn_head_size=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                kv_head_count=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                num_hidden_layers=cfg.num_hidden_layers, process_group=self.group, seq_length_is_variable=True)
        return self._by_batch[batch_size]

    def __call__(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, *args, **kwargs):
        if "position_ids" not in kwargs or kwargs["position_ids"] is None:
            raise ValueError("Ulysses sequence parallelism needs the global position_ids of the local shard in "
                             "every forward (use mst.distributed.shard_batch)")
        # HF built the mask for the local shard only; after the all-to-all it would be wrong, so it is dropped
        # and the core attention runs causal on the gathered full sequence (DeepSpeed's wrapper does the same).
        groups = getattr(module, "num_key_value_groups", None)
        try:
            return self._instance(query.shape[0])(module, query, key, value, None, *args, **kwargs)
        finally:
            if groups is not None:  # DeepSpeed rewrites it when kv heads are replicated; keep the module unchanged
                module.num_key_value_groups = groups


def install(model: nn.Module, group: Any) -> None:
    """Route every attention module of ``model`` through Ulysses over ``group`` (a second call replaces the first)."""
    impl = model.config._attn_implementation
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(f"Ulysses sequence parallelism needs attn_implementation in {SUPPORTED_ATTENTION} "
                         f"(masks are dropped and causality comes from positions); the model uses {impl!r}. "
                         "Build it with attn_implementation='sdpa'.")
    init_deepspeed_comm(dist.get_backend())
    route(model, lambda core_attention: UlyssesAttention(core_attention, model.config, group))
