"""The experiments' timer: round-robin rounds, so load from other jobs on a shared machine hits every entry alike.

Each round calls every entry once, the order rotating from round to round (so no entry always runs first, after
another's caches or page faults); warm-up rounds are not recorded. An entry that runs out of memory
(``is_allocation_failure``: CUDA, cuBLAS or CPU allocator) is dropped from the rounds and reported as None; any other
error propagates. A small op can be called several times per sample (``calls``) so timer resolution and noise stay
small. On CUDA every sample is bracketed by synchronisations.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from mst.memory.length_search import is_allocation_failure
from mst.memory.measure import free_memory


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: str | torch.device, calls: int = 1) -> float:
    """Wall seconds per call of ``fn`` over ``calls`` calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def round_robin(steps: dict[str, Callable[[], object]], *, rounds: int, warmup: int, device: str | torch.device,
                before: Callable[[str], None] | None = None, calls: dict[str, int] | None = None,
                on_round: Callable[[], None] | None = None) -> dict[str, list[float] | None]:
    """Seconds of each entry per sample over ``rounds`` recorded rounds after ``warmup`` ones (see the module doc).
    ``before(name)`` runs untimed before each call (e.g. switching a model's strategy); ``on_round`` after each
    round (a progress bar)."""
    times: dict[str, list[float] | None] = {name: [] for name in steps}
    live = list(steps)
    for index in range(warmup + rounds):
        shift = index % max(1, len(live))
        for name in live[shift:] + live[:shift]:
            if before is not None:
                before(name)
            try:
                elapsed = seconds(steps[name], device, (calls or {}).get(name, 1))
            except Exception as exc:
                if not is_allocation_failure(exc):
                    raise
                live.remove(name)
                times[name] = None
                free_memory()
                continue
            if index >= warmup:
                times[name].append(elapsed)
        if on_round is not None:
            on_round()
    return times


def throughput(times: list[float], tokens: int) -> dict:
    """Median seconds per step with its interquartile range, and tokens/s."""
    q1, med, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return {"s_per_step": med, "iqr_s": [q1, q3], "tokens_per_s": tokens / med,
            "tokens_per_s_iqr": [tokens / q3, tokens / q1], "times_s": times}
