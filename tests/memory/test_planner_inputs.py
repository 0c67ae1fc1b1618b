"""Nonsense planner inputs raise ValueError naming the input, at every entry point (``ModelSpec``, ``Workload``,
``Budget``, ``plan``, ``max_seq_len``, ``Plan.fits``), and a search that stops at its cap says so."""
from __future__ import annotations

import dataclasses
import math

import pytest

from mst.configs import load_config
from mst.memory import max_seq_len, plan
from mst.memory.planner import Budget, ModelSpec, Workload


@pytest.fixture(scope="module")
def llama3():
    return load_config("llama3-8b")


@pytest.mark.parametrize("key, value", [("num_attention_heads", 0), ("vocab_size", 0), ("num_hidden_layers", -2),
                                        ("hidden_size", 0), ("intermediate_size", -1), ("num_key_value_heads", 0),
                                        ("head_dim", 0)])
def test_config_sizes_must_be_positive_integers(key: str, value: int) -> None:
    cfg = load_config("llama3-8b")
    setattr(cfg, key, value)  # HF configs accept these assignments
    with pytest.raises(ValueError, match=f"{key} must be a positive integer, got {value}"):
        ModelSpec.from_config(cfg)
    with pytest.raises(ValueError, match=key):
        plan(cfg, 1024, "mst")


@pytest.mark.parametrize("field, value", [("hidden", "4096"), ("layers", 32.0), ("vocab", True), ("heads", math.nan),
                                          ("kv_heads", None)])
def test_spec_sizes_must_be_integers(llama3, field: str, value) -> None:
    spec = ModelSpec.from_config(llama3)
    with pytest.raises(ValueError, match="must be a positive integer"):
        dataclasses.replace(spec, **{field: value})


def test_heads_must_group_over_kv_heads() -> None:
    cfg = load_config("llama3-8b")
    cfg.num_key_value_heads = 5
    with pytest.raises(ValueError, match=r"num_attention_heads \(32\) must be a multiple of num_key_value_heads \(5\)"):
        ModelSpec.from_config(cfg)


@pytest.mark.parametrize("cap", [0.0, -30.0, math.inf, math.nan])
def test_final_softcap_must_be_positive_and_finite(cap: float) -> None:
    cfg = load_config("gemma2-9b")
    cfg.final_logit_softcapping = cap
    with pytest.raises(ValueError, match="final_logit_softcapping must be a positive finite number"):
        ModelSpec.from_config(cfg)


@pytest.mark.parametrize("field, value", [("seq_len", True), ("seq_len", 1024.0), ("seq_len", -1024),
                                          ("batch_size", 0), ("sp_size", 0), ("lora_rank", 0), ("lora_rank", 2.5)])
def test_workload_numbers_must_be_positive_integers(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
        Workload(**{"seq_len": 1024, field: value})


@pytest.mark.parametrize("gpu, reserve, message", [
    (math.nan, 0.0, "gpu_mem_gb must be a positive finite number"),
    (math.inf, 0.0, "gpu_mem_gb must be a positive finite number"),
    (0.0, 0.0, "gpu_mem_gb must be a positive finite number"),
    ("80", 0.0, "gpu_mem_gb must be a positive finite number"),
    (80.0, -50.0, "reserve_gb must be a finite number from 0 to less than gpu_mem_gb"),
    (80.0, math.nan, "reserve_gb must be a finite number"),
    (80.0, 80.0, "reserve_gb must be a finite number from 0 to less than gpu_mem_gb"),
])
def test_budget_must_be_a_real_card(gpu, reserve, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Budget(gpu, reserve)


def test_budget_usable_bytes() -> None:
    assert Budget(80.0, 1.5).usable_bytes == 78.5 * 1024 ** 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpu_mem_gb=math.nan), "gpu_mem_gb"),
    (dict(reserve_gb=-50.0), "reserve_gb"),
    (dict(granularity=0), "granularity must be a positive integer"),
    (dict(granularity=2.5), "granularity must be a positive integer"),
    (dict(max_len=0), "max_len must be a positive integer"),
    (dict(max_len=100), "max_len 100 is less than one search step of 256 tokens"),
    (dict(sp_size=0), r"sp_size must be a positive integer"),
    (dict(grad_accumulation=1), "grad_accumulation is a flag"),  # a count, as make_train_step's accumulation_steps
])
def test_max_seq_len_rejects_nonsense(llama3, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        max_seq_len(llama3, "mst", **kwargs)


@pytest.mark.parametrize("gpu_mem_gb", [math.nan, -1.0, 0.0])
def test_plan_rejects_a_nonsense_card(llama3, gpu_mem_gb: float) -> None:
    with pytest.raises(ValueError, match="gpu_mem_gb must be a positive finite number"):
        plan(llama3, 1024, "mst", gpu_mem_gb=gpu_mem_gb)


def test_fits_checks_the_card_it_is_given(llama3) -> None:
    p = plan(llama3, 8192, "mst", gpu_mem_gb=80)
    assert p.fits() and p.fits(None) and not p.fits(20)
    with pytest.raises(ValueError, match="gpu_mem_gb must be a positive finite number"):
        p.fits(0)  # was read as "use the planned card"
    with pytest.raises(ValueError, match="reserve_gb"):
        p.fits(80, reserve_gb=-50)


def test_search_reports_its_cap(llama3) -> None:
    found = max_seq_len(llama3, "mst", gpu_mem_gb=80)
    assert not found.capped and found % 256 == 0
    huge = max_seq_len(llama3, "mst", gpu_mem_gb=1e9)
    assert huge == 1 << 23 and huge.capped  # nothing up to the cap overflows: the limit is at least the cap
    small_cap = max_seq_len(llama3, "mst", sp_size=2, gpu_mem_gb=80, max_len=5000)
    assert small_cap == 4608 and small_cap.capped  # the largest multiple of 2 x 256 under the cap
    none = max_seq_len(llama3, "vanilla", gpu_mem_gb=46, reserve_gb=0, optimizer="adamw_in_backward")
    assert none == 0 and not none.capped
