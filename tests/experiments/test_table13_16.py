"""Smoke test of the Tables 13-16 driver at tiny sizes (a subprocess: experiments' ``plot`` modules share a name).

It must run end to end, write its JSON / markdown / figures, and its two memory counts must agree: the planner's
fake-tensor trace of an op and ``measure_peak`` of the same op really run, at the measured size.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_table13_16_driver_tiny(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "experiments.table13_16.ablation", "--scale", "128",
           "--seq-lens", "1024", "40000", "--chunks", "4", "--reps", "1", "--anchor-reps", "0", "--no-max-len",
           "--chunk-seq-lens", "32768", "--chunk-tokens", "4096", "16384", "--out-dir", str(tmp_path), "--figures", str(tmp_path)]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    for name in ("table13_16_cpu.json", "table13_16_cpu.md", "table13_16_ablation.png", "table13_16_chunk_default.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "table13_16_cpu.json").read_text())
    assert len(results["rows"]) == 2 * (2 + 3)  # S x (LM-head: standard, M=4; MLP: standard, naive 4, recompute 4)
    for row in results["rows"]:
        assert row["planner_scaled"]["peak_bytes"] == pytest.approx(row["measured"]["peak_bytes"], rel=0.01), row
        assert row["measured"]["time_s"] > 0
    at = {(r["op"], r["setting"]): r["planner"]["peak_bytes"] for r in results["rows"] if r["seq_len"] == 40000}
    assert at[("lm_head", "4")] < at[("lm_head", "standard")]
    assert at[("mlp", "recompute 4")] < at[("mlp", "naive 4")] < at[("mlp", "standard")]
    assert {c["setting"] for c in results["chunk_default"]["ops"]} == {"4096", "16384", "M=32"}
    target = {r["setting"]: r for r in results["lm_head_target"]["rows"]}
    blocked = target["C=1024, dW by 8192-row blocks"]
    assert blocked["fp32_accumulator_bytes"] == 0
    assert blocked["intermediate_bytes"] < target["C=1024"]["intermediate_bytes"] - target["C=1024"]["fp32_accumulator_bytes"] / 2
    for name in ("C=1024", "C=1024, dW by 8192-row blocks", "C=512, dW by 8192-row blocks"):
        m = target[name]["measured"]
        assert m["planner_scaled"]["peak_bytes"] == pytest.approx(m["peak_bytes"], rel=0.01), name


@pytest.mark.parametrize("argv, flag", [(["--scale", "0"], "--scale"), (["--chunk-scale", "-1"], "--chunk-scale"),
                                        (["--seq-lens", "1024", "0"], "--seq-lens"), (["--chunks", "0"], "--chunks"),
                                        (["--reps", "0"], "--reps"), (["--warmup", "-1"], "--warmup"),
                                        (["--anchor-reps", "-1"], "--anchor-reps"),
                                        (["--chunk-tokens", "0"], "--chunk-tokens"),
                                        (["--chunk-seq-lens", "nan"], "--chunk-seq-lens"),
                                        (["--plan-seq-len", "0"], "--plan-seq-len"),
                                        (["--gpu-mem-gb", "nan"], "--gpu-mem-gb"),
                                        (["--gpu-mem-gb", "0"], "--gpu-mem-gb"),
                                        (["--granularity", "0"], "--granularity")])
def test_ablation_rejects_nonsense_flags(argv, flag, capsys):
    """Argparse error naming the flag, exit 2 (0 no longer means "default" for --scale / --chunk-scale)."""
    from experiments.table13_16 import ablation
    from tests.utils import argparse_exit

    assert flag in argparse_exit(ablation.parse_args, argv, capsys)
    assert ablation.parse_args(["--anchor-reps", "0", "--warmup", "0"]).anchor_reps == 0  # 0 still skips them


@pytest.mark.parametrize("failure", [MemoryError(), RuntimeError("CUDA error: out of memory"),
                                     RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
                                     RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                  "68719476736 bytes. Error code 12 (Cannot allocate memory)")])
def test_measure_case_records_any_allocation_failure_as_oom(monkeypatch, failure):
    from types import SimpleNamespace

    from experiments.table13_16 import ablation

    def build(*args, **kwargs):
        raise failure

    monkeypatch.setattr(ablation, "build", build)
    args = SimpleNamespace(mem_dtype=None, time_dtype=None, device="cpu", reps=1, warmup=0)
    assert ablation.measure_case("mlp", None, 16, {}, args) == {"oom": True}


def test_measure_case_propagates_other_errors(monkeypatch):
    """A bug is not an OOM cell: it stops the run."""
    from types import SimpleNamespace

    from experiments.table13_16 import ablation
    args = SimpleNamespace(mem_dtype=None, time_dtype=None, device="cpu", reps=1, warmup=0)
    for bug in (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), TypeError("out of memory")):
        def build(*a, bug=bug, **k):
            raise bug

        monkeypatch.setattr(ablation, "build", build)
        with pytest.raises(type(bug)):
            ablation.measure_case("lm_head", None, 16, {}, args)
