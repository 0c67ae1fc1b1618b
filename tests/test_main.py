"""``python -m mst plan``: table and JSON output, and exit code 2 with a message on stderr for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mst.__main__ import main
from mst.memory.strategies import STRATEGIES


def test_json_has_a_max_seq_len_per_strategy(capsys):
    assert main(["plan", "--model", "llama3-8b", "--gpu-mem-gb", "80", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    lengths = result["max_seq_len"]
    assert set(lengths) == set(STRATEGIES)
    assert all(isinstance(v, int) and v > 0 and v % 256 == 0 for v in lengths.values())
    assert lengths["vanilla"] < lengths["ac"] < lengths["mst"] <= lengths["mst_offload"]
    for strategy, plan in result["plans"].items():
        assert plan["peak_bytes"] <= 80 * 1024 ** 3, strategy


def test_table_and_options(capsys):
    argv = ["plan", "--model", "llama2-7b", "--gpus", "2", "--strategy", "mst", "--strategy", "ac",
            "--optimizer", "adamw_in_backward", "--grad-accumulation"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "max seq len" in out and "mst" in out and "ac" in out and "vanilla" not in out


def test_unknown_model_exits_2(capsys):
    assert main(["plan", "--model", "llama9-1t"]) == 2
    err = capsys.readouterr().err
    assert "llama9-1t" in err and "llama3-8b" in err  # names the known models


def test_weights_exceeding_the_gpu_exit_2(capsys):
    assert main(["plan", "--model", "gemma2-9b", "--gpu-mem-gb", "16", "--strategy", "mst"]) == 2
    err = capsys.readouterr().err
    assert "weights" in err and "budget" in err


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "mst", "plan", "--model", "mistral-7b", "--strategy", "mst",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["max_seq_len"]["mst"] > 0


@pytest.mark.parametrize("argv", [["plan"], ["plan", "--model", "llama3-8b", "--engine", "magic"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
