"""The planner (both engines) against measured training steps on CPU: within 5% (in practice well under 1%).

Measured: one real step (forward with labels, backward, optimizer update) after a warm-up step, by
``mst.memory.measure_peak`` (MemTracker), with the repo's training step ``mst.memory.strategies.make_train_step``.
Planned: ``plan(..., device="cpu")`` (on a CPU, mst_offload's host checkpoints sit in the same memory).
Fast: one size, every strategy. Slow: three model sizes x three lengths x every strategy, plus bf16,
optimizer-in-backward, gradient accumulation, batch 2 and the other families (every row of mst.integrations.FAMILIES).
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mst.configs import scaled_config
from mst.integrations import FAMILIES
from mst.memory import measure_peak, plan
from mst.memory.planner.traced import causal_attention
from mst.memory.strategies import STRATEGIES, make_train_step, prepare
from tests.utils import tiny_config

TOLERANCE = 0.05  # the target; both engines are within 0.5% on every case below


def measured_and_planned(config, seq_len: int, strategy: str, *, dtype=torch.float32, optimizer="adamw",
                         accumulation: int = 1, batch_size: int = 1, mst_options: dict | None = None
                         ) -> tuple[int, dict[str, int]]:
    """(measured peak, {engine: planned peak}); with ``mst_options`` (``mst.apply`` what-ifs), or for a family the
    analytic engine has no terms for, the traced engine only."""
    torch.manual_seed(0)
    # the planner's attention (SDPA without a mask): the only SDPA path for Gemma-2, identical memory elsewhere
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=causal_attention())
    step, track = make_train_step(prepare(model, strategy, **(mst_options or {})), optimizer=optimizer,
                                  accumulation_steps=accumulation, batch_size=batch_size)
    step(seq_len)  # optimizer state exists from here on, as in every later step
    measured = measure_peak(lambda: step(seq_len), track).peak_bytes
    traced_only = mst_options or FAMILIES[config.model_type].analytic_gap
    engines = ("traced",) if traced_only else ("analytic", "traced")
    planned = {engine: plan(config, seq_len, strategy, dtype=dtype, optimizer=optimizer, engine=engine,
                            grad_accumulation=accumulation > 1, batch_size=batch_size, device="cpu",
                            mst_options=mst_options).peak_bytes
               for engine in engines}
    return measured, planned


def check(measured: int, planned: dict[str, int]) -> None:
    for engine, peak in planned.items():
        assert abs(peak - measured) <= TOLERANCE * measured, (engine, peak, measured, (peak - measured) / measured)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_planner_matches_measured(strategy):
    check(*measured_and_planned(scaled_config("llama3-8b", 64, num_hidden_layers=2), 1024, strategy))


@pytest.mark.slow
@pytest.mark.parametrize("seq_len", [512, 1024, 2048])
@pytest.mark.parametrize("hidden", [64, 128, 256])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_planner_matches_measured_grid(hidden, seq_len, strategy):
    check(*measured_and_planned(scaled_config("llama3-8b", hidden, num_hidden_layers=2), seq_len, strategy))


BF16, IN_BWD = dict(dtype=torch.bfloat16), dict(optimizer="adamw_in_backward")


@pytest.mark.slow
@pytest.mark.parametrize("name,strategy,kwargs", [
    ("llama3-8b", "vanilla", BF16), ("llama3-8b", "ac", BF16), ("llama3-8b", "mst", BF16),
    ("llama3-8b", "mst", IN_BWD), ("llama3-8b", "ac", IN_BWD),
    ("llama3-8b", "mst", dict(accumulation=3)), ("llama3-8b", "mst", dict(BF16, accumulation=3, **IN_BWD)),
    ("llama3-8b", "vanilla", dict(batch_size=2)), ("llama3-8b", "mst", dict(batch_size=2)),
    ("qwen2-7b", "mst", BF16), ("mistral-7b", "ac", dict()),
    ("gemma2-9b", "vanilla", dict(BF16, **IN_BWD)), ("gemma2-9b", "mst", dict(BF16, **IN_BWD)),  # tied, 4 norms
    ("gemma2-9b", "mst", dict()),
])
def test_planner_matches_measured_variants(name, strategy, kwargs):
    # Gemma-2's attention softcap has no SDPA path; FlashAttention applies it in-kernel, so memory is unchanged
    config = scaled_config(name, 96, num_hidden_layers=2,
                           **({"attn_logit_softcapping": None} if name.startswith("gemma") else {}))
    check(*measured_and_planned(config, 1024, strategy, **kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("family,overrides", [
    ("qwen3", {}), ("gemma", {}), ("gemma3_text", {"num_hidden_layers": 6}), ("phi3", {}), ("cohere", {}),
    ("cohere", {"use_qk_norm": True}), ("granite", {})])
@pytest.mark.parametrize("strategy,kwargs", [("vanilla", dict(BF16, **IN_BWD)), ("ac", dict()), ("mst", dict()),
                                             ("mst", BF16)])
def test_planner_matches_measured_families(family, overrides, strategy, kwargs):
    """The families the planner covers beyond the four above (tiny configs: q/k norms, Gemma norms, two rotary
    tables, fused projections, Cohere's parallel block). use_cache=False, as in training: without checkpointing
    HF would otherwise build a KV cache whose contiguous copy of v frees Phi-3's fused q|k|v output early."""
    config = tiny_config(family, use_cache=False, **overrides)  # (Gemma-3's attention softcap is off by default)
    check(*measured_and_planned(config, 1024, strategy, **kwargs))


NORMS = {"norms": True}


@pytest.mark.parametrize("strategy", ["mst", "mst_offload"])
def test_planner_matches_measured_norms(strategy):
    """``mst.apply(norms=True)`` (the traced engine: the analytic one does not model it)."""
    check(*measured_and_planned(scaled_config("llama3-8b", 64, num_hidden_layers=2), 1024, strategy,
                                mst_options=NORMS))


@pytest.mark.slow
@pytest.mark.parametrize("name,strategy,kwargs", [
    ("llama3-8b", "mst", BF16), ("llama3-8b", "mst", dict(BF16, **IN_BWD)), ("llama3-8b", "mst_offload", BF16),
    ("llama3-8b", "mst", dict(accumulation=3)), ("gemma2-9b", "mst", dict(BF16, **IN_BWD)),
])
def test_planner_matches_measured_norms_variants(name, strategy, kwargs):
    config = scaled_config(name, 96, num_hidden_layers=2,
                           **({"attn_logit_softcapping": None} if name.startswith("gemma") else {}))
    check(*measured_and_planned(config, 1024, strategy, mst_options=NORMS, **kwargs))


ATTENTION = {"attention": True}
WHOLE_LAYER = {"norms": True, "attention": True}


@pytest.mark.parametrize("options", [ATTENTION, WHOLE_LAYER], ids=["attention", "norms+attention"])
@pytest.mark.parametrize("strategy", ["mst", "mst_offload"])
def test_planner_matches_measured_attention(strategy, options):
    """``mst.apply(attention=True)`` on CPU (SDPA per query chunk with its boolean mask; the traced engine)."""
    check(*measured_and_planned(scaled_config("llama3-8b", 64, num_hidden_layers=2), 1024, strategy,
                                mst_options=options))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "phi3", "cohere"])
def test_planner_matches_measured_norms_families(family):
    check(*measured_and_planned(tiny_config(family, use_cache=False), 1024, "mst", dtype=torch.bfloat16,
                                mst_options=NORMS))



@pytest.mark.slow
@pytest.mark.parametrize("options", [None, NORMS, WHOLE_LAYER], ids=["mst", "norms", "norms+attention"])
def test_per_token_bytes_match_the_planner(options):
    """The slope of the step peak over the length (bytes per token, what decides the max length) within 3% of
    the traced engine's, with and without the norms in mini-sequences (which roughly halve it)."""
    config = scaled_config("llama3-8b", 64, num_hidden_layers=2)
    (m1, p1), (m2, p2) = (measured_and_planned(config, s, "mst", mst_options=options) for s in (2048, 4096))
    measured, planned = (m2 - m1) / 2048, (p2["traced"] - p1["traced"]) / 2048
    assert abs(planned - measured) <= 0.03 * measured, (planned, measured)
