"""The max-length search: finds the boundary exactly on a synthetic step, survives OOM, trains for real."""
from __future__ import annotations

import pytest
import torch

from mst.memory.length_search import search_max_seq_len
from mst.memory.strategies import make_train_step, prepare
from tests.utils import tiny_model


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
