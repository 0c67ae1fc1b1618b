"""experiments.table7.run: end to end at toy size (results JSON, markdown, curves and figure), runs kept
apart by every setting that changes them, and no merging of results made with other settings."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.table7 import run as run_table7

ROOT = Path(__file__).resolve().parents[2]


def _corpora():
    try:
        from experiments.data import gpt2_tokenizer, kjv_verses
        gpt2_tokenizer(), kjv_verses()
    except Exception as e:  # CorpusMissingError: the script would stop with the same message
        pytest.skip(str(e))


def _script(tmp_path, *flags):
    cmd = [sys.executable, "-m", "experiments.table7.run", "--no_wandb", "--work_dir", str(tmp_path / "work"),
           "--results", str(tmp_path / "results"), "--figures", str(tmp_path / "results"), *flags]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    return json.loads((tmp_path / "results" / "table7_cpu.json").read_text())


@pytest.mark.slow
def test_table7_script_writes_results(tmp_path):
    _corpora()
    record = _script(tmp_path, "--parts", "exact,context", "--exact_steps", "2", "--exact_context", "64",
                     "--context_steps", "2", "--context_start", "128", "--context_max", "256", "--eval_tokens", "512")
    res = tmp_path / "results"
    assert record["exact"]["max_rel_dloss"] < 1e-4
    ctx = record["context"]
    assert ctx["longest"]["mst"] > ctx["longest"]["ac"] and ctx["mst_context"] == 256
    assert ctx["runs"]["ac"]["heldout_own_context"]["tokens"] == ctx["runs"]["mst"]["heldout_own_context"]["tokens"]
    assert (res / "table7_cpu.md").read_text().startswith("# Table 7")
    assert (res / "table7_convergence.png").stat().st_size > 0
    assert {p.name for p in (res / "curves").glob("*.csv")} == {
        "exact_fp32_vanilla.csv", "exact_fp32_mst.csv", "context_ac_128.csv", "context_mst_256.csv"}
    assert not [p for p in res.rglob(".*.tmp*")]  # every output replaced atomically, no temporary left


@pytest.mark.slow
def test_rerun_with_new_flags_trains_anew(tmp_path):
    """Re-running with another learning rate trains new runs (the old work dir is kept, not resumed) and reports
    their numbers; re-running with the first flags again reuses the first runs."""
    _corpora()
    flags = ["--parts", "exact", "--exact_steps", "2", "--exact_context", "64"]
    first = _script(tmp_path, *flags, "--lr", "1e-3")
    second = _script(tmp_path, *flags, "--lr", "3e-2")
    assert second["meta"]["args"]["lr"] == 3e-2
    assert second["exact"]["final_loss"] != first["exact"]["final_loss"]
    assert len(list((tmp_path / "work").glob("exact_fp32_*"))) == 4  # {vanilla, mst} x {1e-3, 3e-2}
    again = _script(tmp_path, *flags, "--lr", "1e-3")
    assert again["exact"]["final_loss"] == first["exact"]["final_loss"]
    assert len(list((tmp_path / "work").glob("exact_fp32_*"))) == 4


def _settings(args, **run):
    spec = dict(strategy="mst", context=256, steps=30, preset="tiny-llama", dtype=torch.float32,
                micro_order="forward", accumulation_steps=2)
    return run_table7.run_settings(args, **{**spec, **run})


@pytest.mark.parametrize("flag, value", [
    ("lr", 3e-3), ("seed", 1), ("data_seed", 1), ("micro_batch", 2), ("corpus", "kjv"), ("data_path", "x.json"),
    ("weights", "/models/llama"), ("mlp_chunk_tokens", 32), ("lm_head_chunk_tokens", 32), ("device", "cuda"),
])
def test_run_dir_changes_with_every_global_setting(flag, value):
    base = run_table7.parse_args([])
    changed = run_table7.parse_args([f"--{flag}", str(value)] if flag != "device" else [])
    if flag == "device":
        changed.device = "cuda"
    work = Path("work")
    a, b = (run_table7.run_dir(work, "exact_fp32_mst", _settings(x)) for x in (base, changed))
    assert a != b and a.parent == b.parent == work and a.name.startswith("exact_fp32_mst-")


@pytest.mark.parametrize("key, value", [("strategy", "vanilla"), ("context", 512), ("steps", 31),
                                        ("preset", "llama3-8b"), ("dtype", torch.bfloat16),
                                        ("micro_order", "reverse"), ("accumulation_steps", 3)])
def test_run_dir_changes_with_every_run_setting(key, value):
    args = run_table7.parse_args([])
    assert (run_table7.run_dir(Path("w"), "t", _settings(args))
            != run_table7.run_dir(Path("w"), "t", _settings(args, **{key: value})))


def test_run_dir_ignores_where_and_how_fast():
    """Output folders, wandb and the thread count do not change what a run computes: the same run dir."""
    base = run_table7.parse_args([])
    other = run_table7.parse_args(["--threads", "2", "--no_wandb", "--results", "/tmp/r", "--work_dir", "/tmp/w",
                                   "--parts", "exact", "--eval_tokens", "64"])
    assert run_table7.run_dir(Path("w"), "t", _settings(base)) == run_table7.run_dir(Path("w"), "t", _settings(other))


def test_results_of_other_settings_are_not_merged(tmp_path, capsys):
    """A run of some parts adds them to the previous results only when those were made with the same settings;
    otherwise the old entries (e.g. a context part with another lr) would be reported under the new flags."""
    out = tmp_path / "table7_cpu.json"
    old = run_table7.parse_args(["--parts", "context"])
    out.write_text(json.dumps({"meta": {"args": vars(old)}, "context": {"ppl_ratio_ac_over_mst": 2.0}}))
    same = run_table7.parse_args(["--parts", "exact", "--threads", "2"])
    assert run_table7.previous_record(out, same)["context"] == {"ppl_ratio_ac_over_mst": 2.0}
    assert run_table7.previous_record(out, run_table7.parse_args(["--parts", "exact", "--lr", "1e-2"])) == {}
    assert "lr" in capsys.readouterr().out
    assert run_table7.previous_record(tmp_path / "missing.json", same) == {}


@pytest.mark.parametrize("argv, flag", [
    (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "-1e-3"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--accumulation_steps", "0"], "--accumulation_steps"), (["--exact_steps", "0"], "--exact_steps"),
    (["--context_start", "-256"], "--context_start"), (["--micro_batch", "0"], "--micro_batch"),
    (["--threads", "-1"], "--threads"), (["--budget_gib", "0"], "--budget_gib"),
    (["--budget_gib", "nan"], "--budget_gib"), (["--mlp_chunk_tokens", "0"], "--mlp_chunk_tokens"),
    (["--eval_tokens", "0"], "--eval_tokens"), (["--bf16_accumulation_steps", "0"], "--bf16_accumulation_steps"),
    (["--context_start", "512", "--context_max", "256"], "--context_max"),
    (["--parts", "exact,contxt"], "--parts"),
])
def test_bad_flags_are_argparse_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        run_table7.parse_args(argv)
    assert info.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_parse_args_fills_device_defaults():
    args = run_table7.parse_args(["--lr", "2e-3"])
    assert isinstance(args, argparse.Namespace)
    assert (args.lr, args.accumulation_steps, args.model) == (2e-3, run_table7.DEFAULTS["cpu"]["accumulation_steps"], "tiny-llama")
