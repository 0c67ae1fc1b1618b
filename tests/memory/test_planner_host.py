"""The planner's model-state-on-host mode (DeepSpeed ZeRO-3 offload), the step-cost estimate, and the length search.

The device terms of ``model_state="host"`` are checked against hand sums of ``ZeroOffload``'s rules (what it
claims, term by term); that ZeRO-3 offload itself trains exactly is tests/distributed/test_engines_torchrun.py.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from mst.__main__ import main
from mst.configs import load_config
from mst.memory.planner import ModelSpec, ZeroOffload, max_seq_len, plan, step_cost
from mst.memory.planner.plan import _bracket_search

GiB = 1024 ** 3


@pytest.fixture(scope="module")
def llama3():
    return load_config("llama3-8b")


def test_host_state_device_terms_by_hand(llama3):
    spec, zero = ModelSpec.from_config(llama3), ZeroOffload()
    p = plan(llama3, 65536, "mst_offload", model_state="host")
    d, layers, bf16 = 4096, 32, 2
    resident = (layers * 2 * d + d) * bf16 + spec.buffer_bytes + zero.reduce_bucket_size * bf16  # norms + bucket
    layer = (spec.layer_params - 2 * d) * bf16 + zero.prefetch_bucket_size * bf16
    assert p.phase == "backward: top layer"
    assert p.breakdown["weights"] == resident + layer
    assert p.breakdown["optimizer_state"] == 0
    # host: 18 bytes per parameter (bf16 partition, fp32 master, fp32 gradient, Adam's two states) + checkpoints
    assert p.host_bytes == 18 * spec.params + layers * 65536 * d * bf16
    head = plan(llama3, 65536, "mst_offload", model_state="host").phases["backward: LM head + loss"]
    assert head > 0
    # no gradient outlives its layer: the host plan's gradients are the top layer's own, far below the model's
    assert p.breakdown["gradients"] < spec.layer_params * bf16


def test_host_state_moves_the_limit(llama3):
    device = max_seq_len(llama3, "mst_offload", optimizer="adamw_in_backward")
    host = max_seq_len(llama3, "mst_offload", model_state="host")
    assert host > 2 * device  # 45 GiB of model state leave the card
    two = max_seq_len(llama3, "mst_offload", model_state="host", sp_size=2)
    assert two > host
    assert plan(llama3, 1024, "mst", model_state="host", sp_size=2).host_bytes == 18 * ModelSpec.from_config(
        llama3).params // 2  # ZeRO partitions the host state over the ranks


@pytest.mark.parametrize("options, message", [
    (dict(optimizer="adamw_in_backward"), "use optimizer='adamw'"),
    (dict(device="cpu"), "both are one memory"),
    (dict(quantization="nf4"), "not modelled"),
    (dict(model_state="disk"), "model_state must be one of"),
])
def test_host_state_bad_input(llama3, options, message):
    options = {"model_state": "host", **options}
    with pytest.raises(ValueError, match=message):
        plan(llama3, 1024, "mst", **options)


def test_step_cost_by_hand(llama3):
    spec = ModelSpec.from_config(llama3)
    S = 131072
    cost = step_cost(llama3, S, "mst_offload", model_state="host", tflops=500, host_gbps=20)
    matmul = 2 * S * (sum(i * o for i, o in spec.layer_linears()) * 32 + 128256 * 4096)
    attention = 2 * S * S * 4096 * 32
    assert cost.model_flops == 3 * (matmul + attention)
    # recompute: the checkpointed layers' forward and the LM head's logits
    head = 2 * S * 128256 * 4096
    assert cost.hardware_flops == cost.model_flops + (matmul - head) + attention + head
    checkpoints = 32 * S * 4096 * 2
    assert cost.host_to_device_bytes == checkpoints + 2 * spec.params * 2
    assert cost.device_to_host_bytes == checkpoints + spec.params * 2
    assert cost.compute_s == pytest.approx(cost.hardware_flops / 500e12)
    assert cost.step_s == max(cost.compute_s, cost.host_to_device_bytes / 20e9)
    # Ulysses: each rank does 1/sp of every term; mini-sequence attention recomputes attention once more
    eight = step_cost(llama3, S, "mst_offload", model_state="host", sp_size=8, attention=True)
    assert eight.hardware_flops == pytest.approx((cost.hardware_flops + attention) / 8)
    assert step_cost(llama3, S, "vanilla").hardware_flops == step_cost(llama3, S, "vanilla").model_flops
    with pytest.raises(ValueError, match="tflops"):
        step_cost(llama3, S, tflops=float("inf"))


def test_cli_model_state_host(capsys):
    assert main(["plan", "--model", "llama3-8b", "--strategy", "mst_offload", "--model-state", "host",
                 "--seq-len", "65536", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_state"] == "host" and out["plans"]["mst_offload"]["model_state"] == "host"
    assert out["costs"]["mst_offload"]["step_s"] > 0
    assert main(["plan", "--model", "llama3-8b", "--strategy", "mst", "--model-state", "host"]) == 0
    table = capsys.readouterr().out
    assert "model state on the host" in table and "step s" in table


def _bisect(peak, limit, most):
    lo, hi = 1, most + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(mid) <= limit else (lo, mid)
    return lo


def test_bracket_search_equals_bisection():
    """The interpolating search returns exactly what plain bisection does, for any increasing peak: linear,
    quadratic, staircase, flat stretches, limits at the cap."""
    rng = random.Random(0)
    for _ in range(3000):
        a, b = rng.uniform(0, 1e6), rng.uniform(0, 1e4)
        c = rng.choice([0.0, rng.uniform(0, 10)])
        steps = sorted(rng.sample(range(1, 5000), 10))
        kind = rng.choice(["poly", "stairs"])
        if kind == "poly":
            def peak(g, a=a, b=b, c=c):
                return a + b * g + c * g * g
        else:
            def peak(g, steps=steps):
                return sum(1000 for s in steps if g >= s) + g
        most = rng.choice([1, 2, 10, 1000, 4096, 100_000])
        limit = rng.uniform(peak(1), peak(most) * 1.5 + 1)
        lo, hi = _bracket_search(peak, limit, peak(1), most)
        assert lo == _bisect(peak, limit, most) and hi == lo + 1


def test_bracket_search_plans_few_times(llama3, monkeypatch):
    """A full-size traced plan takes seconds, so the search must not take dozens of them."""
    import sys

    module = sys.modules["mst.memory.planner.plan"]
    calls, real = [], module.plan
    monkeypatch.setattr(module, "plan", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert max_seq_len(llama3, "mst", optimizer="adamw_in_backward") == 85248
    assert len(calls) <= 10, calls
