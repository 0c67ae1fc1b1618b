"""experiments.gpu.run: the one GPU script (issue 22). Its smoke mode runs every part's code on CPU, so the script
cannot rot between GPU leases; the budget, the skip rules and the bounded max-length search are checked here with a
fake clock and fake steps."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from experiments.gpu import run as gpu
from tests.utils import argparse_exit

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.slow
def test_smoke_runs_every_part_and_writes_nothing_committed(tmp_path):
    """`bash experiments/gpu/run.sh --smoke` (what CI runs): every part done, each JSON with the environment header,
    the summary and the closing table; nothing lands in the experiments' results folders."""
    committed = sorted(ROOT.glob("experiments/*/results/gpu_*.json")) + sorted(ROOT.glob("experiments/gpu/results/*"))
    done = subprocess.run(["bash", "experiments/gpu/run.sh", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {name: p["status"] for name, p in summary["parts"].items()} == {p.name: "done" for p in gpu.PARTS}
    for part in gpu.PARTS:
        result = json.loads((tmp_path / f"gpu_{part.name}.json").read_text())
        env = result["environment"]
        assert env["device_type"] == "cpu" and env["versions"]["torch"] and env["versions"]["transformers"]
        assert result["status"] == "done" and result["run"]["mode"] == "smoke", part.name
    results = {p.name: json.loads((tmp_path / f"gpu_{p.name}.json").read_text()) for p in gpu.PARTS}
    tests = results["exactness"]["tests"]
    assert tests["returncode"] == 0 and tests["skipped"] == len(tests["tests"]) == len(gpu.cuda_test_ids())  # no GPU
    assert all(c["no_worse_than_vanilla"] for c in results["exactness"]["bf16"])
    assert all(r["measured_bytes"] for r in results["validation"]["rows"] + results["ladder"]["rows"])
    ladder = results["ladder"]
    assert {r["strategy"] for r in ladder["rows"]} == {"mst_offload", "mst_norms", "mst_norms_offload"}
    assert all(abs(r["error_pct"]) < 5 for r in ladder["rows"] if r["strategy"].startswith("mst_norms"))  # traced
    assert set(ladder["slopes"]) >= {"mst_norms", "mst_norms_offload"}
    assert all(len(c["trials"]) <= gpu.MAX_PROBES and c["max_seq_len"] > 0
               for c in results["max_length"]["cells"].values())
    assert all(g["mst/ac"] for g in results["throughput"]["groups"])
    assert "| part | status |" in done.stdout and (tmp_path / "summary.md").read_text() in done.stdout
    assert committed == sorted(ROOT.glob("experiments/*/results/gpu_*.json")) + sorted(
        ROOT.glob("experiments/gpu/results/*"))


def test_budget_shares_are_cumulative():
    """Part i ends at start + shares 0..i scaled to the total: time left unused goes on, an overrun is taken from
    the next part; a part starts only with a quarter of its own share left."""
    clock = FakeClock()
    budget = gpu.Budget(40, {"a": 1, "b": 3}, clock)
    assert budget.share_s == {"a": 10, "b": 30} and budget.left("a") == 10 and budget.left("b") == 40
    clock.now += 5  # a finished early: b has its 30 s and a's 5 s
    assert budget.left("b") == 35
    clock.now += 27.5  # an overrun elsewhere: b has 7.5 s, exactly a quarter of its share
    assert budget.can_start("b") and budget.elapsed() == 32.5
    clock.now += 0.1
    assert not budget.can_start("b")


def test_parts_skip_on_time_or_missing_modules_and_a_failure_does_not_stop_the_run(tmp_path, capsys):
    """A part with too little time left is "skipped: time" and writes no file (an earlier run's results stay); one
    whose module is missing is skipped by name; a part that raises is "failed" with its traceback and the next one
    still runs; the summary and the closing table say all of it."""
    clock = FakeClock()

    def slow(run, save):
        save({"items": [1]})
        clock.now += 25  # overruns its 10 s share and the next part's
        return {"items": [1, 2]}

    def broken(run, save):
        raise RuntimeError("a bug")

    parts = (gpu.Part("one", "1", 10, slow, "gpu"), gpu.Part("two", "2", 10, slow, "gpu"),
             gpu.Part("three", "3", 10, slow, "gpu", needs=("no_such_module_here",)),
             gpu.Part("four", "4", 10, broken, "gpu"), gpu.Part("five", "5", 10, lambda run, save: {}, "gpu"))
    (tmp_path / "gpu_two.json").write_text("earlier result")
    summary = gpu.run_parts(gpu.smoke_setting(), parts, 50, tmp_path, clock)
    status = {name: p["status"] for name, p in summary["parts"].items()}
    assert status == {"one": "done", "two": "skipped: time", "three": "skipped: needs no_such_module_here",
                      "four": "failed", "five": "done"}
    assert (tmp_path / "gpu_two.json").read_text() == "earlier result" and not (tmp_path / "gpu_three.json").exists()
    one, four = (json.loads((tmp_path / f"gpu_{n}.json").read_text()) for n in ("one", "four"))
    assert one["items"] == [1, 2] and one["status"] == "done" and "environment" in one
    assert four["status"] == "failed" and "RuntimeError: a bug" in four["traceback"]
    assert json.loads((tmp_path / "summary.json").read_text())["parts"]["four"]["status"] == "failed"
    table = capsys.readouterr().out
    assert "| two | skipped: time |" in table and "| four | failed |" in table


def fake_factory(limit: int, calls: list[int]):
    """Steps that fit up to ``limit`` tokens and run out of memory above it."""
    def make(seq_len: int):
        calls.append(seq_len)

        def step() -> None:
            if seq_len > limit:
                raise MemoryError()
        return step, []

    return make


@pytest.mark.parametrize("limit, best, first_failure, stopped_by", [
    (1000, 1000, 1100, None),  # the prediction is right: seed fits, seed + 2 granules fails, bisection
    (1250, 1200, None, None),  # both fit up to the cap (seed + 2 granules): "at least"
    (800, 800, 900, None),  # seed fails, seed - 2 granules fits, bisection
    (100, 0, 400, "probes"),  # far below: 1000, 800, 400 fail, the fourth probe is refused
])
def test_bounded_search_stops_after_three_probes(limit, best, first_failure, stopped_by):
    calls: list[int] = []
    cell = gpu.bounded_search(fake_factory(limit, calls), expect=1030, granule=100, device=torch.device("cpu"),
                              budget_bytes=None, left=lambda: 1.0)
    assert cell["seed"] == 1000 and len(calls) <= gpu.MAX_PROBES and len(cell["trials"]) == len(calls)
    assert (cell["max_seq_len"], cell["first_failure"], cell["stopped_by"]) == (best, first_failure, stopped_by)
    assert cell["capped"] == (limit >= 1200)


def test_bounded_search_stops_when_the_time_is_up():
    calls: list[int] = []
    cell = gpu.bounded_search(fake_factory(1000, calls), expect=1000, granule=100, device=torch.device("cpu"),
                              budget_bytes=None, left=lambda: 0.0)
    assert calls == [] and cell["stopped_by"] == "time" and cell["max_seq_len"] == 0


@pytest.mark.parametrize("expect, step", [(4352, 256), (19456, 1024), (85248, 5120), (100, 256)])
def test_granularity_is_a_sixteenth_of_the_prediction(expect, step):
    assert gpu.granularity(expect, 256) == step


def test_cuda_tests_are_found_in_the_source():
    ids = gpu.cuda_test_ids()
    assert "tests/ops/test_chunked_lm_head_loss.py::test_cuda_fp32_output_gemm_accumulates_like_the_upcast" in ids
    assert "tests/integrations/test_offload.py::test_offloaded_bytes_leave_the_gpu" in ids
    assert "tests/ops/test_mini_sequence_mlp.py::test_dropout_replay_on_cuda" in ids
    assert not any("test_gpu.py" in i for i in ids)  # its test skipped *on* CUDA is not a CUDA test


def test_junit_counts(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text('<testsuites><testsuite tests="5" failures="1" errors="1" skipped="2"/></testsuites>')
    assert gpu.junit_counts(report) == {"passed": 1, "failed": 1, "errors": 1, "skipped": 2}


@pytest.mark.parametrize("argv, flag", [(["--smoke", "--budget-s", "0"], "--budget-s"),
                                        (["--smoke", "--budget-s", "nan"], "--budget-s"),
                                        (["--smoke", "--parts", "nothing"], "--parts")])
def test_nonsense_flags_exit_2(argv, flag, capsys, tmp_path):
    assert flag in argparse_exit(gpu.main, [*argv, "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_asks_for_smoke(capsys):
    assert "--smoke" in argparse_exit(gpu.main, [], capsys)
