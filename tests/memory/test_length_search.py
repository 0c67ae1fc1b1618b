"""The max-length search: finds the boundary exactly on a synthetic step, survives OOM, trains for real."""
from __future__ import annotations

import pytest
import torch

from mst.memory import length_search, measure
from mst.memory.length_search import FAILED_PEAK, is_allocation_failure, run_trial, search_max_seq_len
from mst.memory.strategies import make_train_step, prepare
from tests.utils import tiny_model


@pytest.fixture(autouse=True)
def no_collection_between_synthetic_trials(request, monkeypatch):
    """The synthetic steps below allocate a few KiB, so the ``gc.collect()`` a trial and its measurement run around
    the step free nothing and only cost time (0.2 s a call in a test process with transformers loaded: most of this
    file's run time). The real search keeps them."""
    if request.function is not test_real_search_orders_strategies:
        for module in (length_search, measure):
            monkeypatch.setattr(module, "free_memory", lambda: None)


def synthetic(limit: int, oom: bool = False):
    """A step whose memory is 1 KiB per token; lengths above ``limit`` exceed the budget or raise OOM."""
    def make_step(seq_len: int):
        def step():
            if oom and seq_len > limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            torch.empty(seq_len * 256, dtype=torch.float32).fill_(1.0)
        return step, []
    return make_step


@pytest.mark.parametrize("limit", [1, 100, 1000, 4095, 4096])
def test_bisection_finds_largest_multiple_of_granularity(limit):
    budget = limit * 1024 + 512
    res = search_max_seq_len(synthetic(limit), budget_bytes=budget, start=64, granularity=16, method="tracker")
    assert res.max_seq_len == (limit // 16 * 16 if limit >= 16 else 0)
    assert all(t.fits == (t.seq_len * 1024 <= budget) for t in res.trials)


def test_oom_is_caught_and_the_search_continues():
    res = search_max_seq_len(synthetic(700, oom=True), budget_bytes=None, start=64, granularity=32)
    assert res.max_seq_len == 672
    assert any(t.error and t.error.startswith("OOM") for t in res.trials)


def test_other_errors_are_not_swallowed():
    def make_step(seq_len):
        def step():
            raise RuntimeError("shape mismatch")
        return step, []
    with pytest.raises(RuntimeError, match="shape mismatch"):
        search_max_seq_len(make_step, budget_bytes=None, start=64)


# what each allocator says when it runs out (messages as torch 2.x prints them)
ALLOCATION_FAILURES = [
    MemoryError(),  # bare: no message at all
    MemoryError("Unable to allocate 8.00 GiB"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes. "
                 "Error code 12 (Cannot allocate memory)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:116] data. DefaultCPUAllocator: not enough memory: you tried to "
                 "allocate 68719476736 bytes."),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    torch.AcceleratorError("CUDA error: out of memory"),
    RuntimeError("std::bad_alloc"),
]
NOT_ALLOCATION_FAILURES = [
    RuntimeError("shape mismatch: value tensor of shape [2] cannot be broadcast"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    ValueError("out of memory budget"),  # a ValueError is a bug in the caller, whatever its text
    TypeError("can't allocate memory"),
    IndexError("list index out of range"),
]


def raising(exc: BaseException, where: str = "step", above: int = 0):
    """make_step whose step (or, with where="make_step", the factory itself) raises ``exc`` for lengths > above."""
    def make_step(seq_len: int):
        if where == "make_step" and seq_len > above:
            raise exc
        def step():
            if where == "step" and seq_len > above:
                raise exc
        return step, []
    return make_step


@pytest.mark.parametrize("exc", ALLOCATION_FAILURES, ids=lambda e: f"{type(e).__name__}:{str(e)[:30]}")
def test_allocation_failures_are_recognised(exc):
    assert is_allocation_failure(exc)


@pytest.mark.parametrize("exc", NOT_ALLOCATION_FAILURES, ids=lambda e: f"{type(e).__name__}:{str(e)[:30]}")
def test_other_errors_are_not_allocation_failures(exc):
    assert not is_allocation_failure(exc)


@pytest.mark.parametrize("where", ["step", "make_step"])
@pytest.mark.parametrize("exc", ALLOCATION_FAILURES, ids=lambda e: f"{type(e).__name__}:{str(e)[:30]}")
def test_allocation_failure_is_a_failed_trial_with_its_text(exc, where):
    """Whether the step or building it (the model, the optimizer: ``make_step``) runs out, the trial fails and
    says why, and the search goes on below that length."""
    trial, breakdown = run_trial(raising(exc, where), 64, None, torch.device("cpu"))
    assert not trial.fits and trial.peak_bytes is None and breakdown == {}
    assert trial.error.startswith("OOM: ")
    assert (str(exc).splitlines()[0][:40] if str(exc) else type(exc).__name__) in trial.error


@pytest.mark.parametrize("where", ["step", "make_step"])
def test_search_goes_on_below_an_allocation_failure(where):
    res = search_max_seq_len(raising(MemoryError(), where, above=700), budget_bytes=None, start=64, granularity=32,
                             method="rss")
    assert res.max_seq_len == 672
    assert [t.error for t in res.trials if not t.fits] == ["OOM: MemoryError"] * sum(not t.fits for t in res.trials)


@pytest.mark.parametrize("where", ["step", "make_step"])
@pytest.mark.parametrize("exc", NOT_ALLOCATION_FAILURES, ids=lambda e: f"{type(e).__name__}:{str(e)[:30]}")
def test_other_errors_propagate(exc, where):
    with pytest.raises(type(exc)):
        run_trial(raising(exc, where), 64, None, torch.device("cpu"))
    with pytest.raises(type(exc)):
        search_max_seq_len(raising(exc, where, above=200), budget_bytes=None, start=64, method="rss")


def test_reduce_peak_decides_the_fit():
    """The reduced peak, not this process's, decides: a reducer reporting twice the peak (another rank using
    twice as much) halves the length found, and every trial records the reduced peak."""
    seen: list[int] = []

    def doubled(peak: int) -> int:
        seen.append(peak)
        return 2 * peak

    budget = 700 * 1024 + 512
    alone = search_max_seq_len(synthetic(10 ** 6), budget_bytes=budget, start=64, granularity=16, method="tracker")
    res = search_max_seq_len(synthetic(10 ** 6), budget_bytes=budget, start=64, granularity=16, method="tracker",
                             reduce_peak=doubled)
    assert (alone.max_seq_len, res.max_seq_len) == (688, 336)
    assert [t.peak_bytes for t in res.trials] == [2 * p for p in seen]
    assert all(t.fits == (t.peak_bytes <= budget) for t in res.trials)


def test_reduce_peak_sees_an_oom_as_infinite_and_spreads_it():
    """An OOM on this rank is reported to the reducer as FAILED_PEAK; a reducer answering FAILED_PEAK (another
    rank ran out) fails a trial that fit here, with no peak and the reason."""
    seen: list[int] = []

    def record(peak: int) -> int:
        seen.append(peak)
        return peak

    trial, _ = run_trial(raising(MemoryError()), 64, None, torch.device("cpu"), reduce_peak=record)
    assert seen == [FAILED_PEAK] and not trial.fits and trial.error == "OOM: MemoryError"
    trial, breakdown = run_trial(synthetic(10 ** 6), 64, None, torch.device("cpu"),
                                 reduce_peak=lambda peak: FAILED_PEAK)
    assert (trial.fits, trial.peak_bytes, trial.error, breakdown) == (False, None, "OOM on another rank", {})
    other_rank_oom = search_max_seq_len(synthetic(10 ** 6), budget_bytes=None, start=64, granularity=32,
                                        reduce_peak=lambda peak: FAILED_PEAK if peak > 700 * 1024 else peak)
    assert other_rank_oom.max_seq_len == 672


def test_bad_arguments():
    with pytest.raises(ValueError):
        search_max_seq_len(synthetic(10), budget_bytes=None, start=0)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_in_backward"])
def test_real_search_orders_strategies(optimizer):
    """Under one budget, MsT fits at least as long a sequence as checkpointing alone, which beats vanilla."""
    found = {}
    for strategy in ("vanilla", "ac", "mst"):
        model = prepare(tiny_model("llama", hidden_size=64, intermediate_size=224, vocab_size=2004,
                                   num_hidden_layers=4, head_dim=16), strategy)
        step, track = make_train_step(model, optimizer=optimizer)
        res = search_max_seq_len(lambda s: ((lambda: step(s)), track), budget_bytes=12 * 2 ** 20, start=128,
                                 granularity=128, method="tracker")
        found[strategy] = res.max_seq_len
    assert 0 < found["vanilla"] < found["ac"] < found["mst"], found


def test_make_train_step_builds_one_optimizer():
    model = prepare(tiny_model("llama"), "mst")
    step, track = make_train_step(model, optimizer="adamw_in_backward")
    before = [p.clone() for p in model.parameters()]
    for seq_len in (8, 16):
        step(seq_len)
    hooks = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    assert hooks == sum(1 for p in model.parameters() if p.requires_grad)  # not one set per length
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_unknown_strategy_and_optimizer():
    with pytest.raises(ValueError, match="unknown strategy"):
        prepare(tiny_model("llama"), "magic")
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_train_step(tiny_model("llama"), optimizer="sgd")


@pytest.mark.parametrize("steps", [0, True, 2.0])
def test_accumulation_steps_is_a_positive_integer(steps):
    with pytest.raises(ValueError, match="accumulation_steps must be a positive integer"):
        make_train_step(tiny_model("llama"), accumulation_steps=steps)


@pytest.mark.parametrize("expect", [1, 40, 640, 700, 704, 800, 5000, 10 ** 6])
@pytest.mark.parametrize("limit", [0, 15, 700, 4096])
def test_search_seeded_by_a_prediction_finds_the_same_limit(limit, expect):
    """A prediction only changes where the search starts: the limit is the same whether it is exact, 10x off or
    below one granule; an exact one costs at most three trials."""
    budget = limit * 1024 + 512
    res = search_max_seq_len(synthetic(limit), budget_bytes=budget, granularity=16, max_len=8192, expect=expect,
                             method="tracker")
    assert res.max_seq_len == limit // 16 * 16
    assert all(t.fits == (t.seq_len * 1024 <= budget) for t in res.trials)
    if expect == limit:
        assert len(res.trials) <= 3
