"""``python -m mst plan``: table and JSON output, and exit code 2 with a message on stderr for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mst.__main__ import main
from mst.configs import CONFIG_DIR
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
    argv = ["plan", "--model", "llama2-7b", "--sp-size", "2", "--strategy", "mst", "--strategy", "ac",
            "--optimizer", "adamw_in_backward", "--grad-accumulation"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "max seq len" in out and "mst" in out and "ac" in out and "vanilla" not in out


def test_norms_plans_the_mst_strategies_with_norms_in_mini_sequences(capsys):
    """--norms (traced engine): the mst rows plan mst.apply(norms=True), longer than without; ac is unchanged."""
    argv = ["plan", "--model", "llama3-8b", "--strategy", "ac", "--strategy", "mst", "--engine", "traced",
            "--seq-len", "65536", "--json", "--optimizer", "adamw_in_backward"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)["plans"]
    assert main(argv + ["--norms"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["norms"] is True
    assert result["plans"]["ac"]["peak_bytes"] == plain["ac"]["peak_bytes"]
    assert result["plans"]["mst"]["peak_bytes"] < plain["mst"]["peak_bytes"]


def test_norms_needs_the_traced_engine(capsys):
    assert main(["plan", "--model", "llama3-8b", "--norms"]) == 2
    assert "--engine traced" in capsys.readouterr().err
    assert main(["plan", "--model", "llama3-8b", "--attention"]) == 2
    assert "--attention is modelled by the traced engine only" in capsys.readouterr().err


def test_attention_plans_mini_sequence_attention(capsys):
    """--attention (traced engine, a GPU: SDPA's flash kernel per query chunk): the mst rows plan it, at the
    memory of the flash kernel the plain mst rows are traced with (the kernel's own fp32 dQ accumulator, which
    no trace sees, is what it removes); no S x S mask enters the trace."""
    argv = ["plan", "--model", "llama3-8b", "--strategy", "mst", "--engine", "traced", "--seq-len", "65536",
            "--json", "--optimizer", "adamw_in_backward", "--norms"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)["plans"]["mst"]["peak_bytes"]
    assert main(argv + ["--attention"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["attention"] is True
    assert abs(result["plans"]["mst"]["peak_bytes"] - plain) <= 0.001 * plain


def test_explain_lists_the_tensors_at_a_layer_backward_peak(capsys):
    """--explain: the layer's tensors at the peak in bytes per token, S for the token dimension, summing to what the
    JSON's peak_tensors hold; the analytic engine has no tensors to list."""
    argv = ["plan", "--model", "llama3-8b", "--strategy", "mst_offload", "--engine", "traced", "--seq-len", "32768",
            "--optimizer", "adamw_in_backward"]
    assert main(argv + ["--explain"]) == 0
    out = capsys.readouterr().out
    assert "backward: top layer: the layer's tensors at the peak" in out and "bfloat16 (1, S, 4096)" in out
    assert main(argv + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plans"]["mst_offload"]
    assert plan["phase"] == "backward: top layer" and plan["peak_tensors"]
    assert sum(t["bytes"] for t in plan["peak_tensors"]) <= plan["peak_bytes"]
    assert main(["plan", "--model", "llama3-8b", "--explain"]) == 2
    assert "--engine traced" in capsys.readouterr().err


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


def _error_line(capsys) -> str:
    """The one line ``main`` printed on stderr (and nothing on stdout)."""
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("options, message", [
    (["--gpu-mem-gb", "nan"], "gpu_mem_gb must be a positive finite number, got nan"),
    (["--gpu-mem-gb", "inf"], "gpu_mem_gb must be a positive finite number, got inf"),
    (["--gpu-mem-gb", "0"], "gpu_mem_gb must be a positive finite number"),
    (["--reserve-gb", "-50"], "reserve_gb must be a finite number from 0 to less than gpu_mem_gb"),
    (["--reserve-gb", "80"], "reserve_gb must be a finite number from 0 to less than gpu_mem_gb"),
    (["--seq-len", "0"], "seq_len must be a positive integer, got 0"),  # was taken as "search"
    (["--seq-len", "-4096"], "seq_len must be a positive integer"),
    (["--sp-size", "0"], "sp_size must be a positive integer, got 0"),
    (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    (["--granularity", "0"], "granularity must be a positive integer, got 0"),
    (["--seq-len", "4096", "--reserve-gb", "-1"], "reserve_gb"),  # checked even when nothing is searched
    (["--tflops", "nan"], "tflops must be a positive finite number, got nan"),
    (["--host-gbps", "-1"], "host_gbps must be a positive finite number, got -1.0"),
    (["--model-state", "host", "--optimizer", "adamw_in_backward"], "use optimizer='adamw'"),
])
def test_nonsense_numbers_exit_2(capsys, options: list[str], message: str):
    assert main(["plan", "--model", "llama3-8b", "--strategy", "mst", *options]) == 2
    assert message in _error_line(capsys)


def test_search_cap_is_reported_not_passed_off_as_the_answer(capsys):
    assert main(["plan", "--model", "llama3-8b", "--strategy", "mst", "--gpu-mem-gb", "1e9"]) == 0
    assert "at least 8388608 (the search cap)" in capsys.readouterr().out
    assert main(["plan", "--model", "llama3-8b", "--strategy", "mst", "--gpu-mem-gb", "1e9", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_seq_len"]["mst"] == 1 << 23 and result["capped"] == {"mst": True}
    assert main(["plan", "--model", "llama3-8b", "--strategy", "mst", "--strategy", "vanilla", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["capped"] == {"mst": False, "vanilla": False}
    assert main(["plan", "--model", "llama3-8b", "--strategy", "mst"]) == 0
    assert "search cap" not in capsys.readouterr().out


def _shipped(name: str) -> dict:
    """The shipped config.json of ``name`` (without the ``_source`` notes)."""
    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def _config_file(path, **changes) -> str:
    """Llama3-8B's config.json with ``changes``, written to ``path``."""
    path.write_text(json.dumps({**_shipped("llama3-8b"), **changes}))
    return str(path)


@pytest.mark.parametrize("changes, message", [
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
    ({"num_hidden_layers": -2}, "num_hidden_layers must be a positive integer, got -2"),  # planned negative grads
    ({"hidden_size": "big"}, "hidden_size must be a positive integer, got 'big'"),
    ({"intermediate_size": 14336.5}, "intermediate_size must be a positive integer, got 14336.5"),
    ({"num_key_value_heads": 5}, "must be a multiple of num_key_value_heads (5)"),
])
def test_bad_config_files_exit_2(capsys, tmp_path, changes: dict, message: str):
    assert main(["plan", "--model", _config_file(tmp_path / "config.json", **changes)]) == 2
    assert message in _error_line(capsys)


def test_unreadable_config_files_exit_2(capsys, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    assert main(["plan", "--model", str(bad)]) == 2
    assert "broken.json" in _error_line(capsys)
    eps = _config_file(tmp_path / "eps.json", rms_norm_eps="tiny")  # not a planner size: transformers' type check
    assert main(["plan", "--model", eps]) == 2
    assert "rms_norm_eps" in _error_line(capsys)


def test_missing_relative_config_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--model", "missing.json"]) == 2
    err = _error_line(capsys)
    assert "config file 'missing.json' does not exist" in err and "huggingface" not in err.lower()


def test_config_file_plans_like_the_shipped_name(capsys, tmp_path):
    assert main(["plan", "--model", _config_file(tmp_path / "config.json"), "--strategy", "mst", "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)["max_seq_len"]
    assert main(["plan", "--model", "llama3-8b", "--strategy", "mst", "--json"]) == 0
    assert from_file == json.loads(capsys.readouterr().out)["max_seq_len"]
