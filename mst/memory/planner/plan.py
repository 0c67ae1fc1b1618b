"""``plan`` (the peak of one training step) and ``max_seq_len`` (the longest sequence that fits), either engine.

    from mst.configs import load_config
    from mst.memory import plan, max_seq_len
    p = plan(load_config("llama3-8b"), 60_000, "mst", optimizer="adamw_in_backward")
    p.peak_gib, p.phase, p.breakdown                   # e.g. where the step peaks and what it is made of
    max_seq_len(load_config("llama3-8b"), "mst", gpu_mem_gb=80, optimizer="adamw_in_backward")

The planner predicts what tensors hold (the number ``torch.cuda.max_memory_allocated`` tracks, up to allocator
rounding): on a GPU add the CUDA context, cuBLAS workspaces and fragmentation, hence ``reserve_gb``.
Sequence parallelism (``sp_size`` > 1, DeepSpeed-Ulysses): each rank holds S / sp_size tokens for the MLP, norms, LM head
and checkpoints, and attention runs on heads / sp_size over the full sequence, which is the same number of bytes;
weights, gradients and optimizer state are replicated (no ZeRO) unless ``model_state="host"``: then they live on
the host through DeepSpeed ZeRO-3 offload, partitioned over the ranks (``ZeroOffload``), and the device holds the
gathered parameters of the running module and the gradient bucket. The all-to-all adds one set of q, k, v buffers
to a layer's forward and backward peak.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers import PretrainedConfig

from .analytic import analytic_profiles
from .compose import GiB, Plan, compose
from .spec import Budget, ModelSpec, Workload, check_positive_int

ENGINES = ("analytic", "traced")
DEFAULT_RESERVE_GB = 1.5  # an "80 GB" card exposes ~79.2 GiB; CUDA context + cuBLAS + fragmentation take ~1 GiB more
DEFAULT_MAX_LEN = 1 << 23  # max_seq_len's search cap (8M tokens)


class MaxSeqLen(int):
    """``max_seq_len``'s answer: an int (tokens), plus ``capped``: True when nothing up to the search cap
    ``max_len`` overflowed, so the true limit is *at least* this length (raise ``max_len`` to look further)."""

    capped: bool

    def __new__(cls, tokens: int, capped: bool = False) -> "MaxSeqLen":
        value = super().__new__(cls, tokens)
        value.capped = capped
        return value


def _resolve(config: PretrainedConfig | str) -> PretrainedConfig:
    if isinstance(config, str):
        from ...configs import load_config

        return load_config(config)
    return config


def plan(config: PretrainedConfig | str, seq_len: int, strategy: str = "mst", *, sp_size: int = 1, gpu_mem_gb: float = 80.0,
         optimizer: str = "adamw", dtype: torch.dtype = torch.bfloat16, grad_accumulation: bool = False,
         engine: str = "analytic", batch_size: int = 1, device: str = "cuda",
         mst_options: dict | None = None, quantization: str | None = None, lora_rank: int = 16,
         model_state: str = "device") -> Plan:
    """Predicted peak memory of one training step of ``config`` (an HF config or a ``mst.configs`` name).

    strategy: "vanilla" | "ac" | "mst" | "mst_offload"; optimizer: "adamw" (for-loop AdamW, the repo's training
    step) | "adamw_in_backward" (``mst.memory.optimizer_in_backward``); grad_accumulation, a flag: the step is a
    micro-step in the middle of an accumulation window (every gradient resident; no step count, unlike
    ``make_train_step``'s ``accumulation_steps``); engine: "analytic" | "traced".
    ``device="cpu"`` plans a CPU run instead (offloaded checkpoints count, CPU AdamW defaults), used to validate
    the planner against measured CPU steps. ``gpu_mem_gb`` only fills ``Plan.gpu_mem_gb`` (see ``Plan.fits``).
    ``mst_options``: what-if ``mst.apply`` options for the traced engine, e.g. ``{"mlp_mode": "naive",
    "lm_head_chunks": 64}`` to model the official code (docs/paper.md §5.2: its MLP loop keeps every chunk's
    intermediates). ``quantization`` ("int8" | "nf4", analytic engine): frozen k-bit projections with rank
    ``lora_rank`` LoRA adapters trained (``mst.memory.quantization``, the paper's Table 5); the bitsandbytes and
    LoRA intermediates are modelled as one dequantized weight per matmul (the adapters' rank-r tensors are ignored).
    ``model_state``: "device" (weights, gradients, AdamW states on the GPU) | "host" (DeepSpeed ZeRO-3 with
    ``offload_param`` and ``offload_optimizer``: the plan's ``host_bytes`` then include this rank's 18 bytes per
    parameter, see ``ZeroOffload``; needs ``optimizer="adamw"``, which then runs on the host).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    Budget(gpu_mem_gb)  # validates the card Plan.fits will compare against
    config = _resolve(config)
    spec = ModelSpec.from_config(config)
    wl = Workload(seq_len=seq_len, strategy=strategy, batch_size=batch_size, sp_size=sp_size, dtype=dtype,
                  optimizer=optimizer, grad_accumulation=grad_accumulation, device=device,
                  mst_options=tuple(sorted((mst_options or {}).items())), quantization=quantization,
                  lora_rank=lora_rank, model_state=model_state)
    wl.check_heads(spec)
    if quantization and engine != "analytic":
        raise ValueError("quantized training is modelled by the analytic engine only (engine='analytic')")
    if wl.mst_options and engine != "traced":
        raise ValueError("mst_options are modelled by the traced engine only (engine='traced')")
    if engine == "traced":
        from .traced import traced_profiles

        layer, head = traced_profiles(config, wl)
    else:
        layer, head = analytic_profiles(spec, wl)
    if sp_size > 1:  # Ulysses all-to-all: q, k, v (and back the output) exist twice during the exchange
        a2a = wl.act_bytes * wl.tokens * (spec.q_dim + 2 * spec.kv_dim)
        layer = dataclasses.replace(layer, fwd_peak=layer.fwd_peak + a2a, bwd_peak=layer.bwd_peak + a2a)
    result = compose(spec, wl, layer, head, engine)
    result.gpu_mem_gb = gpu_mem_gb
    return result


def max_seq_len(config: PretrainedConfig | str, strategy: str = "mst", *, sp_size: int = 1, gpu_mem_gb: float = 80.0,
                reserve_gb: float = DEFAULT_RESERVE_GB, optimizer: str = "adamw",
                dtype: torch.dtype = torch.bfloat16, grad_accumulation: bool = False, engine: str = "analytic",
                batch_size: int = 1, granularity: int = 256, max_len: int = DEFAULT_MAX_LEN, device: str = "cuda",
                mst_options: dict | None = None, quantization: str | None = None, lora_rank: int = 16,
                model_state: str = "device") -> MaxSeqLen:
    """Longest sequence (a multiple of ``granularity`` x ``sp_size``, at most ``max_len``) whose planned peak fits
    ``gpu_mem_gb`` GiB minus ``reserve_gb``; 0 if not even one granule fits. Found by ``_bracket_search`` (the peak
    grows with S). The result is an int whose ``capped`` is True when the search reached ``max_len`` without
    overflowing: then the true limit is at least that (``MaxSeqLen``). The step options are ``plan``'s
    (``grad_accumulation`` is a flag).

    Raises ValueError for nonsense numbers (``Budget``, ``Workload``, granularity / max_len not positive integers,
    max_len below one step) and when weights + optimizer state (+ resident gradients) alone exceed the budget.
    """
    budget = Budget(gpu_mem_gb, reserve_gb)
    check_positive_int("granularity", granularity)
    check_positive_int("max_len", max_len)
    check_positive_int("sp_size", sp_size)
    step = granularity * sp_size
    if max_len < step:
        raise ValueError(f"max_len {max_len} is less than one search step of {step} tokens (granularity x sp_size)")
    kwargs = dict(sp_size=sp_size, gpu_mem_gb=gpu_mem_gb, optimizer=optimizer, dtype=dtype,
                  grad_accumulation=grad_accumulation, engine=engine, batch_size=batch_size, device=device,
                  mst_options=mst_options, quantization=quantization, lora_rank=lora_rank, model_state=model_state)
    config = _resolve(config)

    limit = budget.usable_bytes

    def peak(granules: int) -> int:
        return plan(config, granules * step, strategy, **kwargs).peak_bytes

    first = plan(config, step, strategy, **kwargs)
    static = first.breakdown["weights"] + first.breakdown["optimizer_state"] + (
        first.breakdown["gradients"] if grad_accumulation else 0)
    if static > limit:
        raise ValueError(f"weights and optimizer state alone need {static / GiB:.1f} GiB, more than the "
                         f"{gpu_mem_gb - reserve_gb:.1f} GiB budget ({gpu_mem_gb} GiB - {reserve_gb} GiB reserve)")
    if first.peak_bytes > limit:
        return MaxSeqLen(0)
    most = max_len // step  # granules under the cap
    lo, hi = _bracket_search(peak, limit, first.peak_bytes, most)
    return MaxSeqLen(lo * step, capped=lo == most)


def _bracket_search(peak, limit: float, first_peak: int, most: int) -> tuple[int, int]:
    """The largest granule count ``lo`` in [1, most] with ``peak(lo) <= limit`` (``peak(1)`` known to fit, peak
    increasing), and ``hi = lo + 1``. Each guess is the linear interpolation of the two latest peaks, aimed 2% past
    the limit while no overflow is known, and alternated with bisection once bracketed, so a near-linear peak is
    found in a handful of plans (a traced plan at full size takes seconds) and any monotone one still exactly."""
    lo, lo_peak, hi, hi_peak = 1, first_peak, most + 1, None
    prev, prev_peak = None, None
    bisect = False
    while hi - lo > 1:
        if hi_peak is None:  # no overflow seen yet: extrapolate past the limit (double without a slope)
            slope = (lo_peak - prev_peak) / (lo - prev) if prev is not None else 0
            guess = max(lo + (limit - lo_peak) / slope * 1.02 + 1 if slope > 0 else 2 * lo, 1.25 * lo)
        elif bisect:
            guess = (lo + hi) / 2
        else:  # interpolate inside the bracket
            guess = lo + (limit - lo_peak) * (hi - lo) / (hi_peak - lo_peak)
        bisect = hi_peak is not None and not bisect
        x = min(max(int(guess), lo + 1), hi - 1)
        x_peak = peak(x)
        if x_peak <= limit:
            prev, prev_peak, lo, lo_peak = lo, lo_peak, x, x_peak
        else:
            hi, hi_peak = x, x_peak
    return lo, hi
