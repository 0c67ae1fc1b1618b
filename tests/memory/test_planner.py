"""The memory planner's API and its full-size predictions (no real training here; see test_planner_measured.py).

- the two engines (closed-form sizes vs the real HF + mst code on fake tensors) agree at Llama3-8B scale, and on a
  tiny config of every family in ``mst.integrations.FAMILIES`` (the one table ``mst.apply`` and the planner read);
- they reproduce docs/environment.md §7's independent full-model fake traces (32 layers, MemTracker): Llama3-8B at 8K,
  bf16, AdamW: 105.9 GiB vanilla, 61.79 GiB with checkpointing;
- orderings the paper's argument rests on, sequence parallelism, ``max_seq_len``'s contract and bad input.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import mst.memory.planner
from mst.configs import load_config, scaled_config
from mst.integrations import FAMILIES
from mst.memory import max_seq_len, plan
from mst.memory.planner import ModelSpec
from mst.memory.strategies import STRATEGIES
from tests.utils import GENERIC_FAMILY, tiny_config

GiB = 1024 ** 3


@pytest.fixture(scope="module")
def llama3():
    return load_config("llama3-8b")


# parameter totals of the public checkpoints (tied embeddings counted once)
PUBLISHED_PARAMS = {"llama3-8b": 8_030_261_248, "llama2-7b": 6_738_415_616, "mistral-7b": 7_241_732_096,
                    "qwen2-7b": 7_615_616_512, "gemma2-9b": 9_241_705_984}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts(name):
    assert ModelSpec.from_config(load_config(name)).params == PUBLISHED_PARAMS[name]
    small = scaled_config(name, 64, num_hidden_layers=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(small)
    assert ModelSpec.from_config(small).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("seq_len", [8192, 61440])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_engines_agree_at_full_size(llama3, strategy, seq_len):
    kw = dict(optimizer="adamw_in_backward")
    analytic = plan(llama3, seq_len, strategy, **kw)
    traced = plan(llama3, seq_len, strategy, engine="traced", **kw)
    assert analytic.peak_bytes == pytest.approx(traced.peak_bytes, rel=0.01)
    assert analytic.phase == traced.phase


# every family of the table, plus the variants that switch a family fact on: Cohere's optional q/k norms, Gemma-3
# with both layer types (two rotary tables), Phi-3's partial RoPE
FAMILY_CASES = [(family, {}) for family in sorted(FAMILIES)] + [
    ("cohere", {"use_qk_norm": True}), ("gemma3_text", {"num_hidden_layers": 6}),
    ("phi3", {"partial_rotary_factor": 0.5})]
FAMILY_IDS = [family + "".join(f"-{k}={v}" for k, v in over.items()) for family, over in FAMILY_CASES]
# tiny shapes: the default (d=32, q = d) at 1024 tokens, and wide heads (8 heads of 32: q = 8 d) at 512 tokens,
# where the q/k norms, fused q|k|v and fp32 RoPE terms dominate a layer
WIDE_HEADS = dict(head_dim=32, num_attention_heads=8, num_key_value_heads=2)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("family,overrides", FAMILY_CASES, ids=FAMILY_IDS)
def test_engines_agree_on_every_family(family, overrides, strategy):
    """The analytic engine's per-family terms against the traced engine running the family's own HF code, with
    the tolerance of ``test_engines_agree_at_full_size`` (1 %, same phase)."""
    cases = [({}, 1024, torch.bfloat16, "adamw_in_backward"), ({}, 1024, torch.float32, "adamw"),
             (WIDE_HEADS, 512, torch.bfloat16, "adamw_in_backward")]
    for shape, seq_len, dtype, optimizer in cases:
        config = tiny_config(family, **{**shape, **overrides})
        kw = dict(dtype=dtype, optimizer=optimizer)
        traced = plan(config, seq_len, strategy, engine="traced", **kw)
        if FAMILIES[family].analytic_gap:  # a family the analytic engine says it cannot plan: the traced one does
            with pytest.raises(ValueError, match="engine='traced'"):
                plan(config, seq_len, strategy, **kw)
            continue
        analytic = plan(config, seq_len, strategy, **kw)
        assert analytic.peak_bytes == pytest.approx(traced.peak_bytes, rel=0.01), (shape, dtype, optimizer)
        assert analytic.phase == traced.phase, (shape, dtype, optimizer)


@pytest.mark.parametrize("family,overrides", FAMILY_CASES, ids=FAMILY_IDS)
def test_spec_matches_the_model_of_every_family(family, overrides):
    """What ``compose`` takes from the spec: parameter count, tensors (CPU AdamW's step counters), the largest
    tensor (the optimizer step's temporaries) and the rotary buffers, against the built HF model."""
    config = tiny_config(family, **overrides)
    spec = ModelSpec.from_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = list(model.parameters())
    assert spec.params == sum(p.numel() for p in params)
    assert spec.layers * len(spec.layer_param_shapes()) + 2 + (0 if spec.tied else 1) == len(params)
    assert spec.largest_param == max(p.numel() for p in params)
    rotary = [b for name, b in model.named_buffers() if "inv_freq" in name]
    assert spec.buffer_bytes == sum(b.numel() * b.element_size() for b in rotary)
    linears = sorted((m.in_features, m.out_features) for m in model.model.layers[0].modules()
                     if isinstance(m, torch.nn.Linear))
    assert sorted(spec.layer_linears()) == linears


def test_planner_reads_the_apply_family_table():
    """One registry: the planner has no family list of its own, and a spec's facts are its family's row."""
    assert not hasattr(mst.memory.planner, "FAMILIES")
    assert mst.memory.planner.spec.FAMILIES is FAMILIES
    for family, row in FAMILIES.items():
        spec = ModelSpec.from_config(tiny_config(family))
        resolved = row.qk_norm is True  # Cohere's is a config flag, off by default
        assert spec.family == dataclasses.replace(row, qk_norm=resolved,
                                                  qk_norm_interleaved=resolved and row.qk_norm_interleaved), family
    assert ModelSpec.from_config(tiny_config("cohere", use_qk_norm=True)).family.qk_norm is True


def test_planner_refuses_families_outside_the_table():
    with pytest.raises(ValueError, match=f"models llama.*cohere.*{GENERIC_FAMILY!r}"):
        plan(tiny_config(GENERIC_FAMILY), 1024, "mst")
    with pytest.raises(ValueError, match=f"{GENERIC_FAMILY!r}"):
        plan(tiny_config(GENERIC_FAMILY), 1024, "mst", engine="traced")
    wrapper = AutoConfig.for_model("llava", text_config=tiny_config("llama"))
    with pytest.raises(ValueError, match=r"multimodal wrapper; plan its text config \('llama'"):
        plan(wrapper, 1024, "mst")
    assert plan(wrapper.get_text_config(), 1024, "mst").model_type == "llama"


@pytest.mark.parametrize("strategy,gib", [("vanilla", 105.9), ("ac", 61.79)])
def test_matches_independent_full_model_trace(llama3, strategy, gib):
    """docs/environment.md §7 traced all 32 layers (two steps, AdamW foreach=False): our one-layer composition agrees."""
    for engine in ("analytic", "traced"):
        assert plan(llama3, 8192, strategy, engine=engine).peak_gib == pytest.approx(gib, rel=0.002)


def test_breakdown_and_orderings(llama3):
    plans = {s: plan(llama3, 32768, s, optimizer="adamw_in_backward") for s in STRATEGIES}
    for p in plans.values():
        assert sum(p.breakdown.values()) == p.peak_bytes
        assert p.phase in p.phases and max(p.phases.values()) == p.peak_bytes
        assert p.breakdown["gradients"] == 0  # optimizer-in-backward frees each gradient at once
        assert "optimizer step" not in p.phases
    assert plans["vanilla"].peak_bytes > plans["ac"].peak_bytes > plans["mst"].peak_bytes \
        > plans["mst_offload"].peak_bytes
    assert plans["mst_offload"].host_bytes == 32 * 32768 * 4096 * 2  # one bf16 checkpoint per layer on the host
    spec = ModelSpec.from_config(llama3)
    assert plans["mst"].breakdown["weights"] == spec.params * 2 + spec.buffer_bytes
    assert plans["mst"].breakdown["optimizer_state"] == 4 * spec.params
    with_step = plan(llama3, 8192, "mst")
    assert "optimizer step" in with_step.phases and with_step.breakdown["gradients"] > 0


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_peak_grows_with_length(llama3, strategy):
    peaks = [plan(llama3, s, strategy).peak_bytes for s in (4096, 8192, 16384, 32768)]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]


def test_gradient_accumulation_keeps_gradients(llama3):
    plain = plan(llama3, 16384, "mst", optimizer="adamw_in_backward")
    accumulating = plan(llama3, 16384, "mst", optimizer="adamw_in_backward", grad_accumulation=True)
    assert accumulating.breakdown["gradients"] >= ModelSpec.from_config(llama3).params * 2
    assert accumulating.peak_bytes > plain.peak_bytes + 14 * GiB


def test_cpu_device_counts_offloaded_checkpoints():
    config = scaled_config("llama3-8b", 64, num_hidden_layers=2)
    kw = dict(dtype=torch.float32, device="cpu")
    assert plan(config, 2048, "mst_offload", **kw).peak_bytes == plan(config, 2048, "mst", **kw).peak_bytes
    assert plan(config, 2048, "mst_offload").peak_bytes < plan(config, 2048, "mst").peak_bytes  # cuda


def test_sequence_parallel_divides_the_activations(llama3):
    one = plan(llama3, 16384, "mst", optimizer="adamw_in_backward")
    four = plan(llama3, 4 * 16384, "mst", sp_size=4, optimizer="adamw_in_backward")
    static = one.breakdown["weights"] + one.breakdown["optimizer_state"]
    # same tokens per rank; the all-to-all adds at most one set of q, k, v buffers to a layer's peak
    assert 0 <= four.peak_bytes - one.peak_bytes <= 16384 * (4096 + 2 * 1024) * 2
    assert four.peak_bytes < plan(llama3, 4 * 16384, "mst", optimizer="adamw_in_backward").peak_bytes
    assert four.breakdown["weights"] + four.breakdown["optimizer_state"] == static  # replicated, no ZeRO
    with pytest.raises(ValueError, match="divide the attention heads"):
        plan(llama3, 3 * 1024, "mst", sp_size=3)
    with pytest.raises(ValueError, match="not divisible"):
        plan(llama3, 1001, "mst", sp_size=2)


def test_max_seq_len_contract(llama3):
    kw = dict(gpu_mem_gb=80, reserve_gb=1.5, optimizer="adamw_in_backward", granularity=256)
    length = max_seq_len(llama3, "mst", **kw)
    assert length > 0 and length % 256 == 0
    budget = (80 - 1.5) * GiB
    assert plan(llama3, length, "mst", optimizer="adamw_in_backward").peak_bytes <= budget
    assert plan(llama3, length + 256, "mst", optimizer="adamw_in_backward").peak_bytes > budget
    two = max_seq_len(llama3, "mst", sp_size=2, **kw)
    assert two % 512 == 0 and two > length  # more ranks, longer sequences
    assert max_seq_len(llama3, "vanilla", gpu_mem_gb=46, reserve_gb=0, optimizer="adamw_in_backward") == 0
    with pytest.raises(ValueError, match="weights and optimizer state alone"):
        max_seq_len(llama3, "mst", gpu_mem_gb=40)


def test_bad_input(llama3):
    with pytest.raises(ValueError, match="unknown strategy"):
        plan(llama3, 1024, "lossy")
    with pytest.raises(ValueError, match="unknown optimizer"):
        plan(llama3, 1024, "mst", optimizer="sgd")
    with pytest.raises(ValueError, match="engine"):
        plan(llama3, 1024, "mst", engine="magic")
    with pytest.raises(ValueError, match="seq_len"):
        plan(llama3, 0, "mst")
    with pytest.raises(ValueError, match="models llama"):
        plan(tiny_config(GENERIC_FAMILY), 1024, "mst")
    with pytest.raises(ValueError, match="unknown model config"):
        plan("llama9-1t", 1024, "mst")
    assert plan("llama2-7b", 1024, "mst").model_type == "llama"  # names from mst.configs work too
