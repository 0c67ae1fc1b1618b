"""Maximum trainable sequence length by search over real training steps (the paper's Tables 2-5).

A trial at length S runs ``warmup_steps`` full training steps (forward, backward, optimizer step, so optimizer state
exists), then measures one more with ``measure_peak``. It *fails* when building or running the step runs out of
memory (``is_allocation_failure``: CUDA, cuBLAS or CPU allocator) or when the measured peak exceeds ``budget_bytes``
(how a CPU run emulates a GPU's capacity). Failures are caught, memory is freed, and the search goes on: first
doubling from ``start`` until a failure, then bisection down to ``granularity`` tokens. Any other exception is a bug
and propagates. Nothing here knows about models: ``make_step(seq_len)`` builds the step to try.

Several processes searching together (sequence parallelism: every rank holds a shard of the same step) must take
the same decision at every trial, or they would try different lengths and block each other in the step's
collectives. ``reduce_peak`` (of ``run_trial`` and ``search_max_seq_len``) maps this process's measured peak to the
peak the decision uses, e.g. the largest over ranks by an ``all_reduce(MAX)``; every rank then sees the same number,
the same fit and the same next length. A trial that ran out of memory on this rank contributes ``FAILED_PEAK``
(int64's largest value, "infinite"), so the reduced peak makes it a failure on every rank ("OOM on another rank"
where this rank itself had measured a peak). The trial's ``peak_bytes`` is then the reduced peak, its breakdown
this rank's. Only an allocation failure that leaves the ranks in step can be recovered this way: on every rank
at the same point, or on one rank after the step's last collective (e.g. in the optimizer step). One inside a
collective (an NCCL all-to-all or all-reduce that cannot allocate its buffers), or on one rank before a collective
the others then wait in, cannot: the others stay blocked, or their next collective is matched against this rank's
``reduce_peak``, and the communicator is unusable. So keep a distributed search's budget below the device's
capacity: the budget, not the allocator, should decide.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .measure import free_memory, measure_peak

StepFactory = Callable[[int], tuple[Callable[[], object], list]]  # seq_len -> (step_fn, modules/optimizers to track)
PeakReducer = Callable[[int], int]  # this process's peak bytes -> the peak every process decides on
FAILED_PEAK = torch.iinfo(torch.int64).max  # the peak an out-of-memory trial contributes to ``reduce_peak``


@dataclass
class Trial:
    seq_len: int
    fits: bool
    peak_bytes: int | None = None
    step_time_s: float | None = None
    error: str | None = None


@dataclass
class SearchResult:
    max_seq_len: int  # 0 when even ``start`` does not fit
    budget_bytes: int | None
    device: str
    peak_bytes: int | None = None  # measured at max_seq_len
    step_time_s: float | None = None
    breakdown: dict = field(default_factory=dict)
    trials: list[Trial] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# how torch's allocators word a failed allocation when it is not a torch.OutOfMemoryError: the CUDA runtime
# ("CUDA error: out of memory"), cuBLAS / cuDNN / cuSOLVER handles (*_ALLOC_FAILED), the CPU allocator, C++ new
_ALLOCATION_MESSAGES = ("out of memory", "alloc_failed", "can't allocate memory", "not enough memory",
                        "std::bad_alloc")


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means "this did not fit in memory" (a failed trial), not a bug.

    ``MemoryError`` (whatever its message, often none) and ``torch.OutOfMemoryError``; otherwise only a
    ``RuntimeError`` (which ``torch.AcceleratorError`` is) worded as an allocator failure: any other type is a bug
    in the caller, whatever its text."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _ALLOCATION_MESSAGES)


def _first_line(exc: BaseException) -> str:
    """The first line of the message, or the exception type when there is no message (a bare ``MemoryError()``)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:120] if lines else type(exc).__name__


def run_trial(make_step: StepFactory, seq_len: int, budget_bytes: int | None, device: torch.device,
              warmup_steps: int = 1, method: str = "tracker",
              reduce_peak: PeakReducer | None = None) -> tuple[Trial, dict]:
    """One length: build the step, warm-up steps, then a measured step. Returns the trial and the peak breakdown;
    running out of memory anywhere in it is a failed trial whose ``error`` says so ("OOM: ..."). ``reduce_peak``:
    the peak that decides (see the module docstring); it is called once per trial, whether or not this process ran
    out of memory."""
    peak = elapsed = error = None
    breakdown: dict = {}
    try:
        step, track = make_step(seq_len)
        for _ in range(warmup_steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        report = measure_peak(step, track, device, method=method)
        elapsed = time.perf_counter() - start
        peak, breakdown = report.allocator_peak_bytes or report.peak_bytes, report.breakdown
    except Exception as exc:
        if not is_allocation_failure(exc):
            raise
        error = f"OOM: {_first_line(exc)}"
    finally:
        step = track = None  # noqa: F841  (drop references before freeing)
        free_memory()
    if reduce_peak is not None:
        peak = reduce_peak(FAILED_PEAK if peak is None else peak)
        if peak >= FAILED_PEAK:
            peak, error = None, error or "OOM on another rank"
    if peak is None:
        return Trial(seq_len, False, error=error), {}
    fits = budget_bytes is None or peak <= budget_bytes
    return Trial(seq_len, fits, peak, elapsed, None if fits else "over budget"), breakdown


def search_max_seq_len(make_step: StepFactory, *, budget_bytes: int | None, device: str | torch.device = "cpu",
                       start: int = 256, granularity: int = 64, max_len: int = 1 << 22, warmup_steps: int = 1,
                       progress: Callable[[Trial], None] | None = None, method: str = "tracker",
                       expect: int | None = None, reduce_peak: PeakReducer | None = None) -> SearchResult:
    """Largest multiple of ``granularity`` whose training step fits; see the module docstring.

    Without ``expect``: doubling from ``start`` until a failure, then bisection. With ``expect`` (a prediction, e.g.
    the planner's for this exact setting): the first trial is at ``expect``, then steps of 2, 4, 8, ... granules go
    up while trials fit (or down while they fail) before the bisection, so an accurate prediction costs about three
    trials near the limit instead of a doubling ladder that overshoots it by up to 2x.
    ``method`` is passed to ``measure_peak`` ("rss" makes long CPU searches several times faster).
    ``reduce_peak``: the peak each decision uses, e.g. the largest over ranks (module docstring); with it, every
    process that searches together makes the same trials in the same order.
    """
    if start <= 0 or granularity <= 0:
        raise ValueError(f"start and granularity must be positive, got {start}, {granularity}")
    device = torch.device(device)
    result = SearchResult(0, budget_bytes, str(device))

    def attempt(seq_len: int) -> bool:
        trial, breakdown = run_trial(make_step, seq_len, budget_bytes, device, warmup_steps, method, reduce_peak)
        result.trials.append(trial)
        if progress:
            progress(trial)
        if trial.fits and seq_len > result.max_seq_len:
            result.max_seq_len, result.peak_bytes, result.step_time_s = seq_len, trial.peak_bytes, trial.step_time_s
            result.breakdown = breakdown
        return trial.fits

    if expect is None:
        lo, hi = 0, start
        while hi <= max_len and attempt(hi):  # doubling phase
            lo, hi = hi, hi * 2
    else:
        lo, hi = _bracket(attempt, expect, granularity, max_len)
    hi = min(hi, max_len + granularity)
    while hi - lo > granularity:  # bisection phase, on multiples of granularity
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            break
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    return result


def _bracket(attempt: Callable[[int], bool], expect: int, granularity: int, max_len: int) -> tuple[int, int]:
    """(fits, fails) lengths around ``expect``, found by growing steps of 2, 4, 8, ... granules."""
    seed = min(max(granularity, round(expect / granularity) * granularity), max_len // granularity * granularity)
    step = 2 * granularity
    if attempt(seed):
        lo = seed
        while lo + step <= max_len:
            if not attempt(lo + step):
                return lo, lo + step
            lo, step = lo + step, 2 * step
        return lo, max_len + granularity
    hi = seed
    while hi - step > 0:
        if attempt(hi - step):
            return hi - step, hi
        hi, step = hi - step, 2 * step
    return 0, hi
