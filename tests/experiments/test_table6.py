"""experiments.table6.run end to end at toy size: round-robin timings, larger-batch search, JSON and figure."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_table6_driver_writes_results(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "experiments.table6.run", "--hidden", "32", "--layers", "2",
                    "--steps", "2", "--out", str(tmp_path), "--figures", str(tmp_path)], check=True, cwd=ROOT, env=env)
    results = json.loads((tmp_path / "table6_cpu.json").read_text())
    first = results["groups"][0]
    assert list(first["cells"]) == ["vanilla", "ac", "mst"]
    assert all(len(c["times_s"]) == 2 for c in first["cells"].values())
    assert results["mlp_extra_forward"]["passes_per_step"] == {"vanilla": 1.0, "ac": 2.0, "mst": 2.0}
    larger = results["larger_batch"]
    assert larger["mst"]["max_batch"] >= larger["ac"]["max_batch"] >= 1  # RSS-measured at toy size: noisy
    assert len(results["load_average"]["start"]) == 3
    assert (tmp_path / "table6_cpu.md").read_text().startswith("# Table 6")
    assert (tmp_path / "table6_throughput.png").stat().st_size > 0


@pytest.mark.slow
def test_table6_groups_and_attribution_variants(tmp_path):
    """--groups picks one group, --variants replaces its strategies (MsT with one op left unchunked)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "experiments.table6.run", "--hidden", "32", "--layers", "2",
                    "--steps", "1", "--no-larger-batch", "--groups", "llama3-8b/8192/2", "--variants", "ac",
                    "mst_mlp_unsplit", "mst_lm_head_unchunked", "--out", str(tmp_path), "--figures", str(tmp_path)],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    results = json.loads((tmp_path / "table6_cpu.json").read_text())
    assert [(g["model"], g["batch"]) for g in results["groups"]] == [("llama3-8b", 2)]
    assert list(results["groups"][0]["cells"]) == ["ac", "mst_mlp_unsplit", "mst_lm_head_unchunked"]
    assert {"mst_mlp_unsplit/ac llama3-8b b=2", "mst_lm_head_unchunked/ac llama3-8b b=2"} <= set(results["ratios"])


@pytest.mark.slow
def test_norms_variant_at_a_chosen_length(tmp_path):
    """--variants mst mst_norms --seq-len N: the cost of norms in mini-sequences, at a length where they split."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "experiments.table6.run", "--hidden", "32", "--layers", "2",
                    "--steps", "1", "--no-larger-batch", "--groups", "llama3-8b/8192/1", "--variants", "mst",
                    "mst_norms", "--seq-len", "200", "--out", str(tmp_path), "--figures", str(tmp_path)],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    results = json.loads((tmp_path / "table6_cpu.json").read_text())
    assert results["groups"][0]["seq_len"] == 200
    assert list(results["groups"][0]["cells"]) == ["mst", "mst_norms"]
    assert "mst_norms/mst llama3-8b b=1" in results["ratios"]


def test_markdown_and_ratios_without_the_larger_batch():
    """--no-larger-batch (the scale check at d=512) leaves the equal-batch table and ratios only."""
    from experiments.table6.plot import markdown
    from experiments.table6.run import ratios

    cell = {"s_per_step": 1.0, "iqr_s": [0.9, 1.1], "tokens_per_s": 100.0, "tokens_per_s_iqr": [90.0, 110.0]}
    results = {"environment": {"device": "CPU"}, "dtype": "float32", "optimizer": "adamw_in_backward", "steps": 2,
               "warmup": 1,
               "load_average": {"start": [0, 0, 0], "end": [0, 0, 0]}, "paper": {}, "paper_ratios": {},
               "targets": {}, "larger_batch": {},
               "groups": [{"model": "llama3-8b", "full_seq": 8192, "seq_len": 256, "batch": 2,
                           "cells": {"ac": cell, "mst": {**cell, "tokens_per_s": 95.0}}}]}
    results["ratios"] = ratios(results)
    assert results["ratios"] == {"mst/ac llama3-8b b=2": 0.95}
    assert "Larger batch" not in markdown(results)


def test_attention_op_writes_times(tmp_path):
    """experiments.table6.attention_op at a toy width and length: AC's SDPA and both backends of the op timed."""
    subprocess.run([sys.executable, "-m", "experiments.table6.attention_op", "--hidden", "64", "--seq-lens", "96",
                    "--reps", "2", "--out", str(tmp_path)], check=True, cwd=ROOT, capture_output=True)
    results = json.loads((tmp_path / "attention_op_cpu.json").read_text())
    assert set(results["rows"][0]["seconds"]) == {"ac", "mst_sdpa", "mst_math"}
    assert results["environment"]["device_type"] == "cpu"
    assert "| 96 |" in (tmp_path / "attention_op_cpu.md").read_text()


def test_op_width_writes_ratios(tmp_path):
    """experiments.table6.op_width at two toy widths: both ops timed for AC and MsT, JSON / markdown / PNG."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "experiments.table6.op_width", "--widths", "32", "64", "--reps", "2",
                    "--out", str(tmp_path), "--figures", str(tmp_path)], check=True, cwd=ROOT, env=env,
                   capture_output=True)
    results = json.loads((tmp_path / "op_width_cpu.json").read_text())
    assert [r["d"] for r in results["rows"]] == [32, 64]
    for row in results["rows"]:
        assert row["tokens"] == 4 * row["d"] and row["mlp_chunks"] == 2 and row["lm_head_chunks"] == 16
        for op in ("mlp", "lm_head"):
            assert row[op]["ac"] > 0 and row[op]["mst"] > 0 and len(row[op]["times_s"]["mst"]) == 2
    assert "| 64 | 256 | 2 |" in (tmp_path / "op_width_cpu.md").read_text()
    assert (tmp_path / "table6_op_width.png").stat().st_size > 0


@pytest.mark.parametrize("argv, flag", [(["--steps", "0"], "--steps"), (["--warmup", "-1"], "--warmup"),
                                        (["--steps", "nan"], "--steps"), (["--layers", "0"], "--layers"),
                                        (["--hidden", "-8"], "--hidden"), (["--seq-len", "0"], "--seq-len")])
def test_table6_rejects_nonsense_flags(argv, flag, capsys, tmp_path):
    """Argparse error naming the flag, exit 2, before anything runs or is written."""
    from experiments.table6 import run
    from tests.utils import argparse_exit

    assert flag in argparse_exit(run.main, [*argv, "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, flag", [(["--widths", "32", "0"], "--widths"), (["--reps", "0"], "--reps"),
                                        (["--reps", "inf"], "--reps")])
def test_op_width_rejects_nonsense_flags(argv, flag, capsys, tmp_path):
    from experiments.table6 import op_width
    from tests.utils import argparse_exit

    assert flag in argparse_exit(op_width.main, [*argv, "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


def test_variants_switch_the_model_untimed(monkeypatch):
    """Each round switches the one model to each variant before timing its step; an out-of-memory variant is a
    cell ``{"oom": True}`` and the others are still timed."""
    from types import SimpleNamespace

    from experiments.table6 import run

    current = {}
    monkeypatch.setattr(run, "use", lambda model, variant: current.update(variant=variant))

    def step(seq):
        if current["variant"] == "vanilla":
            raise MemoryError()

    args, bar = SimpleNamespace(device="cpu", warmup=1, steps=2), SimpleNamespace(update=lambda n: None)
    cells = run.time_variants(None, step, ["vanilla", "ac", "mst"], 16, 1, args, bar)
    assert cells["vanilla"] == {"oom": True}
    assert len(cells["ac"]["times_s"]) == 2 and len(cells["mst"]["times_s"]) == 2
