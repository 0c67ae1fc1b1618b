"""The memory budget of a CPU run that emulates a GPU at full size (Table 2's rule, shared by Tables 2-6).

    budget_s = static_s + (gpu_bytes - reserve - static_full) * k * t * dtype_factor,   k = d_s / d

static = weights + gradients + optimizer state (measured for the small model by a 16-token step; planned for the
full one). Every per-token cost (activations, checkpoints, MLP / LM-head intermediates) scales with d, i.e. by k,
so a strategy whose full-size limit is S fits t * S tokens at the small scale (Table 6 scales its sequence by k and
searches the batch: t = k). dtype_factor: per-token tensors of an fp32 CPU model are twice a bf16 model's (the fp32
logits upcast of HF's loss is the exception, which makes the rule slightly favour vanilla / AC: MsT's ratios are
conservative). Strategy names are ``mst.memory.strategies.STRATEGIES``', optionally with ``+int8`` / ``+nf4``
(frozen k-bit weights with LoRA adapters, Table 5).
"""
from __future__ import annotations

import torch
from transformers import PretrainedConfig

from mst.memory.planner import DEFAULT_RESERVE_GB, plan
from mst.memory.quantization import QUANTIZATIONS
from mst.memory.strategies import STRATEGIES

GiB = 1024 ** 3  # the planner reads gpu_mem_gb as GiB and keeps DEFAULT_RESERVE_GB for CUDA context etc.
FULL_DTYPE = torch.bfloat16  # the paper's training dtype, the planner's at full size


def split_strategy(name: str) -> tuple[str, str | None]:
    """"mst+nf4" -> ("mst", "nf4"); "ac" -> ("ac", None). Raises ValueError for unknown parts."""
    strategy, _, quantization = name.partition("+")
    if strategy not in STRATEGIES or (quantization and quantization not in QUANTIZATIONS):
        raise ValueError(f"unknown strategy {name!r}: use one of {', '.join(STRATEGIES)}, optionally "
                         f"+{' / +'.join(QUANTIZATIONS)}")
    return strategy, quantization or None


def planner_kwargs(name: str, *, gpu_mem_gb: float, optimizer: str, accumulation_steps: int = 1,
                   dtype: torch.dtype = FULL_DTYPE) -> tuple[str, dict]:
    """The planner's strategy and keyword arguments for the strategy ``name`` (full size by default)."""
    strategy, quantization = split_strategy(name)
    return strategy, dict(gpu_mem_gb=gpu_mem_gb, optimizer=optimizer, dtype=dtype,
                          grad_accumulation=accumulation_steps > 1, quantization=quantization)


def static_bytes_full(config: PretrainedConfig, name: str, **kwargs) -> float:
    """Weights + gradients + optimizer state of the full-size model under ``name``, from the planner."""
    strategy, planner = planner_kwargs(name, **kwargs)
    breakdown = plan(config, 1, strategy, **planner).breakdown
    return sum(breakdown.get(key, 0) for key in ("weights", "gradients", "optimizer_state"))


def emulated_free_bytes(full: PretrainedConfig, name: str, *, scale: float, dtype: torch.dtype,
                        gpu_mem_gb: float, optimizer: str, accumulation_steps: int = 1) -> int:
    """What a full-size GPU of ``gpu_mem_gb`` GiB leaves free for per-token memory under ``name``, scaled by
    ``scale`` (= k * t) and the dtype factor: add the small model's measured static bytes for its budget."""
    free_full = (gpu_mem_gb - DEFAULT_RESERVE_GB) * GiB - static_bytes_full(
        full, name, gpu_mem_gb=gpu_mem_gb, optimizer=optimizer, accumulation_steps=accumulation_steps)
    dtype_factor = torch.finfo(dtype).bits / torch.finfo(FULL_DTYPE).bits
    return int(free_full * scale * dtype_factor)
