"""experiments.max_length (Tables 2-5) end to end at toy size: planner-seeded searches, JSON/markdown/figure,
results kept cell by cell when a later cell runs out of memory or fails, and clear errors for bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import max_length

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ["-m", "experiments.max_length"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}


@pytest.mark.slow
def test_driver_measures_every_strategy(tmp_path):
    subprocess.run([sys.executable, *SCRIPT, "--table", "table2", "--models", "llama3-8b", "--layers", "2",
                    "--hidden", "32", "--strategies", "vanilla", "mst", "--out", str(tmp_path),
                    "--figures", str(tmp_path)],
                   check=True, cwd=ROOT, env=ENV)
    result = json.loads((tmp_path / "max_length_cpu.json").read_text())
    cells = result["models"][0]["strategies"]
    assert list(cells) == ["vanilla", "mst"]
    for cell in cells.values():
        search = cell["search"]
        assert search["seed"] == cell["planner_small"]  # the planner on the measured setting starts the search
        assert cell["measured_small"] > 0 and search["budget_bytes"] > 0
        assert search["trials"][0]["seq_len"] == pytest.approx(cell["planner_small"], rel=0.05)
        fits = [t["seq_len"] for t in search["trials"] if t["fits"]]
        fails = [t["seq_len"] for t in search["trials"] if not t["fits"]]
        assert max(fits) == cell["measured_small"] and all(f > cell["measured_small"] for f in fails)
    assert cells["mst"]["measured_small"] > cells["vanilla"]["measured_small"]
    assert result["complete"] is True and "in_progress" not in result
    assert (tmp_path / "max_length_cpu.md").read_text().startswith("# table2")
    assert (tmp_path / "fig1c_max_length.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--strategies", "mst+fp8"], "unknown strategy 'mst+fp8'"),
    (["--models", "gpt-7b", "--strategies", "mst"], "gpt-7b"),
    (["--device", "cuda"], "cuda"),
])
def test_bad_input_fails_clearly(tmp_path, args, message):
    if "cuda" in args:
        pytest.importorskip("torch")
        import torch
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, *SCRIPT, "--out", str(tmp_path), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "max_length_cpu.json").exists()


@pytest.mark.parametrize("args, flag", [
    (["--layers", "-1"], "--layers"), (["--layers", "0"], "--layers"), (["--layers", "two"], "--layers"),
    (["--hidden", "0"], "--hidden"), (["--hidden", "-32"], "--hidden"), (["--hidden", "48"], "--hidden"),
    (["--length-scale", "0"], "--length-scale"), (["--length-scale", "-0.5"], "--length-scale"),
    (["--length-scale", "nan"], "--length-scale"), (["--length-scale", "inf"], "--length-scale"),
    (["--gpu-mem-gb", "0"], "--gpu-mem-gb"), (["--gpu-mem-gb", "nan"], "--gpu-mem-gb"),
    (["--gpu-mem-gb", "inf"], "--gpu-mem-gb"), (["--gpu-mem-gb", "1"], "--gpu-mem-gb"),
    (["--accumulation-steps", "0"], "--accumulation-steps"), (["--accumulation-steps", "1.5"], "--accumulation-steps"),
    (["--device", "gpu"], "--device"),
])
def test_bad_numbers_are_argparse_errors(tmp_path, capsys, args, flag):
    """Out-of-range numbers stop at parsing with the flag's name: none is replaced by a default (``--layers 0``
    and ``--length-scale 0`` were) or reaches the model (``--layers -1``)."""
    with pytest.raises(SystemExit) as info:
        max_length.main(["--models", "llama3-8b", "--strategies", "mst", "--out", str(tmp_path), *args])
    assert info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_failing_cell_keeps_the_finished_ones(tmp_path, monkeypatch):
    """Cells run out of memory in every way (the 16-token static probe's step, building the model), then one
    hits a real bug: the out-of-memory cells are recorded as not fitting, with their error text; the bug
    propagates; and what finished is on disk, in whole files (JSON and markdown, rewritten after every trial)."""
    real = max_length.make_train_step
    calls = []

    def make_train_step(model, **kwargs):
        calls.append(len(calls))
        if len(calls) == 2:  # llama3-8b / ac: the step runs out of host memory
            step, track = real(model, **kwargs)

            def failing(seq_len):
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
            return failing, track
        if len(calls) == 3:  # llama3-8b / mst: building it runs out
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if len(calls) == 4:  # llama2-7b / vanilla: a bug
            raise RuntimeError("boom: not an allocation failure")
        return real(model, **kwargs)

    monkeypatch.setattr(max_length, "make_train_step", make_train_step)
    with pytest.raises(RuntimeError, match="boom"):
        max_length.main(["--table", "table2", "--models", "llama3-8b", "llama2-7b", "--strategies", "vanilla", "ac",
                         "mst", "--layers", "1", "--hidden", "32", "--length-scale", "0.005", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "max_length_cpu.json").read_text())
    assert result["complete"] is False
    first, second = result["models"]
    assert (first["layers_small"], first["length_scale"]) == (1, 0.005)  # the flags are used as given
    cells = first["strategies"]
    assert list(cells) == ["vanilla", "ac", "mst"]
    assert cells["vanilla"]["measured_small"] > 0 and cells["vanilla"]["search"]["trials"]
    for strategy, text in (("ac", "OOM: DefaultCPUAllocator: can't allocate memory"),
                           ("mst", "OOM: CUDA out of memory")):
        assert cells[strategy]["measured_small"] == 0
        assert cells[strategy]["search"]["static_probe"]["error"].startswith(text)
    assert (second["model"], second["strategies"]) == ("llama2-7b", {})
    assert result["in_progress"] == {"model": "llama2-7b", "strategy": "vanilla", "trials": []}
    md = (tmp_path / "max_length_cpu.md").read_text()
    assert md.startswith("# table2") and "incomplete" in md and "OOM: CUDA out of memory" in md
    assert "| 0 tok | — |" in md  # measured: nothing fits (0), no planner seed (—), not "no number"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["max_length_cpu.json", "max_length_cpu.md"]
