"""Checkpoint + resume: an interrupted run continues the same curve; logs (jsonl, csv, wandb offline)."""
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mst.train import RunLog, TrainConfig, train
from tests.convergence.synthetic import ragged_batches
from tests.utils import tiny_model

DETERMINISTIC = ("step", "loss", "grad_norm", "tokens")


def _curve(rows):
    return [{k: r[k] for k in DETERMINISTIC} for r in rows]


def test_interrupted_run_resumes_on_the_same_curve(tmp_path):
    cfg = TrainConfig(steps=6, grad_accum=2, lr=1e-3, ckpt_every=2)
    data = ragged_batches(seed=4)
    ref_model = tiny_model("llama")
    ref = train(ref_model, data, cfg, out_dir=tmp_path / "ref", use_wandb=False, progress=False)

    first = train(tiny_model("llama"), data, cfg, out_dir=tmp_path / "run", use_wandb=False, progress=False,
                  stop_after=5)  # "killed" after step 5; its last checkpoint is step 4
    assert len(first) == 5
    resumed_model = tiny_model("llama", seed=123)  # a fresh process: other weights until the checkpoint loads
    resumed = train(resumed_model, data, cfg, out_dir=tmp_path / "run", use_wandb=False, progress=False)
    assert _curve(resumed) == _curve(ref)  # bit-identical, including the redone step 5
    for a, b in zip(ref_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert _curve(logged) == _curve(ref)
    with (tmp_path / "run" / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert [float(r["loss"]) for r in rows] == [r["loss"] for r in ref]


def test_finished_run_is_not_retrained(tmp_path):
    cfg = TrainConfig(steps=2, grad_accum=1, lr=1e-3)
    rows = train(tiny_model("llama"), ragged_batches(), cfg, out_dir=tmp_path, use_wandb=False, progress=False)
    again = train(tiny_model("llama"), ragged_batches(), cfg, out_dir=tmp_path, use_wandb=False, progress=False)
    assert _curve(again) == _curve(rows)


def test_wandb_offline_log(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = RunLog(tmp_path, "offline-test", {"lr": 1e-3}, use_wandb=True, project="mst-test")
    for step in (1, 2):
        log.log({"step": step, "loss": 1.0 / step})
    log.finish({"final_loss": 0.5})
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert (tmp_path / "log.csv").read_text().splitlines() == ["step,loss", "1,1.0", "2,0.5"]


KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from mst.train import TrainConfig, train
    from tests.convergence.synthetic import ragged_batches
    from tests.utils import tiny_model
    cfg = TrainConfig(steps={steps}, grad_accum=2, lr=1e-3, ckpt_every=3)
    train(tiny_model("llama"), ragged_batches(seed=5), cfg, out_dir=sys.argv[1], use_wandb=False, progress=False)
""")


@pytest.mark.slow
def test_sigkilled_process_resumes_on_the_same_curve(tmp_path):
    steps = 30
    script = tmp_path / "job.py"
    script.write_text(KILL_SCRIPT.format(root=str(Path(__file__).resolve().parents[2]), steps=steps))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], env=env)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 8):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(log.read_text().splitlines())
    assert 8 <= done < steps, f"the job was not killed midway ({done} steps logged)"
    subprocess.run([sys.executable, str(script), str(tmp_path / "run")], env=env, check=True)
    ref = train(tiny_model("llama"), ragged_batches(seed=5),
                TrainConfig(steps=steps, grad_accum=2, lr=1e-3, ckpt_every=3), out_dir=tmp_path / "ref",
                use_wandb=False, progress=False)
    resumed = [json.loads(line) for line in log.read_text().splitlines()]
    assert _curve(resumed) == _curve(ref)
