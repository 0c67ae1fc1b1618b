"""experiments.timing: round-robin rounds, allocation failures drop an entry, other errors propagate."""
import pytest

from experiments.timing import round_robin, throughput


def test_rounds_rotate_and_warmup_is_not_recorded():
    calls = []
    times = round_robin({name: (lambda name=name: calls.append(name)) for name in "abc"}, rounds=2, warmup=1,
                        device="cpu")
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(t) for name, t in times.items()} == {"a": 2, "b": 2, "c": 2}


def test_calls_per_sample_and_before():
    calls, switched = [], []
    times = round_robin({"a": lambda: calls.append("a")}, rounds=2, warmup=0, device="cpu", calls={"a": 3},
                        before=switched.append)
    assert calls == ["a"] * 6 and switched == ["a", "a"] and len(times["a"]) == 2


@pytest.mark.parametrize("failure", [RuntimeError("CUDA error: out of memory"), MemoryError(),
                                     RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
                                     RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                                                  "allocate memory: you tried to allocate 8 bytes")])
def test_an_entry_that_runs_out_of_memory_is_dropped(failure):
    """Any allocation failure (``is_allocation_failure``), not only torch.OutOfMemoryError, drops the entry; the
    others are still timed."""
    def fails():
        raise failure

    times = round_robin({"vanilla": fails, "ac": lambda: None, "mst": lambda: None}, rounds=2, warmup=1,
                        device="cpu")
    assert times["vanilla"] is None and len(times["ac"]) == 2 and len(times["mst"]) == 2


@pytest.mark.parametrize("bug", [RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)"),
                                 ValueError("out of memory")])
def test_other_errors_propagate(bug):
    """A bug (a RuntimeError that is not an allocator's, a ValueError) is not an OOM: it stops the run."""
    def fails():
        raise bug

    with pytest.raises(type(bug)):
        round_robin({"ac": fails}, rounds=1, warmup=0, device="cpu")


def test_throughput_is_the_median():
    cell = throughput([1.0, 2.0, 4.0], tokens=100)
    assert cell["s_per_step"] == 2.0 and cell["tokens_per_s"] == 50.0
