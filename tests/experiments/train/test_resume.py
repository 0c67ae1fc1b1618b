"""Checkpoint + resume: an interrupted run continues the same curve, only from its own configuration; logs (jsonl,
csv, wandb offline) that survive a kill."""
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

from experiments.train import ResumeMismatchError, RunLog, TrainConfig, make_optimizer, save_checkpoint, train
from tests.convergence.synthetic import ragged_batches
from tests.utils import tiny_model

DETERMINISTIC = ("step", "loss", "grad_norm", "tokens")


def _curve(rows):
    return [{k: r[k] for k in DETERMINISTIC} for r in rows]


def test_interrupted_run_resumes_on_the_same_curve(tmp_path):
    cfg = TrainConfig(steps=6, accumulation_steps=2, lr=1e-3, ckpt_every=2)
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
    cfg = TrainConfig(steps=2, accumulation_steps=1, lr=1e-3)
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
    from experiments.train import TrainConfig, train
    from tests.convergence.synthetic import ragged_batches
    from tests.utils import tiny_model
    cfg = TrainConfig(steps={steps}, accumulation_steps=2, lr=1e-3, ckpt_every=3)
    train(tiny_model("llama"), ragged_batches(seed=5), cfg, out_dir=sys.argv[1], use_wandb=False, progress=False)
""")


@pytest.mark.slow
def test_sigkilled_process_resumes_on_the_same_curve(tmp_path):
    steps = 30
    script = tmp_path / "job.py"
    script.write_text(KILL_SCRIPT.format(root=str(Path(__file__).resolve().parents[3]), steps=steps))
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
                TrainConfig(steps=steps, accumulation_steps=2, lr=1e-3, ckpt_every=3), out_dir=tmp_path / "ref",
                use_wandb=False, progress=False)
    resumed = [json.loads(line) for line in log.read_text().splitlines()]
    assert _curve(resumed) == _curve(ref)


def _killed_run(out_dir, cfg, **kw):
    """A run stopped after step 3 (``stop_after``) whose last checkpoint is step 2: what a resume finds."""
    return train(tiny_model("llama"), ragged_batches(seed=6), cfg, out_dir=out_dir, use_wandb=False,
                 progress=False, stop_after=3, **kw)


RESUME_CFG = dict(steps=6, accumulation_steps=2, lr=1e-3, ckpt_every=2)


@pytest.mark.parametrize("change, key", [
    (dict(cfg=dict(lr=1e-4)), "train.lr"),
    (dict(cfg=dict(accumulation_steps=3)), "train.accumulation_steps"),
    (dict(cfg=dict(micro_order="reverse", accumulation_steps=3)), "train.micro_order"),
    (dict(run_config={"context": 512}), "run.context"),
    (dict(model=dict(num_hidden_layers=3)), "model.config.num_hidden_layers"),
    (dict(model=dict(vocab_size=103)), "model.config.vocab_size"),
    (dict(mst={"mlp_chunk_tokens": 16}), "model.mst_options"),
])
def test_resume_with_another_config_is_refused(tmp_path, change, key):
    """A checkpoint of another configuration is never resumed: the error names what differs and what to do, and
    nothing is restored into the model (other shapes would otherwise crash in load_state_dict, or train a mix)."""
    _killed_run(tmp_path, TrainConfig(**RESUME_CFG), run_config={"context": 256})
    model = tiny_model("llama", **change.get("model", {}))
    if "mst" in change:
        import mst
        mst.apply(model, **change["mst"])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ResumeMismatchError) as info:
        train(model, ragged_batches(seed=6), TrainConfig(**{**RESUME_CFG, **change.get("cfg", {})}),
              out_dir=tmp_path, use_wandb=False, progress=False,
              run_config=change.get("run_config", {"context": 256}))
    message = str(info.value)
    assert key in message and str(tmp_path) in message and "out_dir" in message and "delete" in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3  # the old run's log is untouched


def test_resume_may_extend_steps_and_change_ckpt_every(tmp_path):
    """steps and ckpt_every do not change the curve (constant LR, stateless data): a resumed run may train longer
    or checkpoint at other steps and still equals an uninterrupted run of the new length."""
    _killed_run(tmp_path / "run", TrainConfig(**RESUME_CFG))
    longer = TrainConfig(**{**RESUME_CFG, "steps": 8, "ckpt_every": 3})
    resumed = train(tiny_model("llama"), ragged_batches(seed=6), longer, out_dir=tmp_path / "run", use_wandb=False,
                    progress=False)
    ref = train(tiny_model("llama"), ragged_batches(seed=6), longer, out_dir=tmp_path / "ref", use_wandb=False,
                progress=False)
    assert _curve(resumed) == _curve(ref)


def test_resume_beyond_steps_is_refused(tmp_path):
    _killed_run(tmp_path, TrainConfig(**RESUME_CFG))  # checkpoint at step 2
    with pytest.raises(ResumeMismatchError, match="step 2.*steps=1"):
        train(tiny_model("llama"), ragged_batches(seed=6), TrainConfig(**{**RESUME_CFG, "steps": 1}),
              out_dir=tmp_path, use_wandb=False, progress=False)


def test_checkpoint_without_a_config_is_refused(tmp_path):
    """A checkpoint that does not say which configuration wrote it (an older mst, or written by hand) cannot be
    checked, so it is not resumed."""
    model = tiny_model("llama")
    save_checkpoint(tmp_path / "checkpoint.pt", model=model, optimizer=make_optimizer(model, TrainConfig(steps=1)),
                    step=1)
    with pytest.raises(ResumeMismatchError, match="no stored configuration"):
        train(tiny_model("llama"), ragged_batches(), TrainConfig(steps=2, accumulation_steps=1), out_dir=tmp_path,
              use_wandb=False, progress=False)


def test_same_config_other_init_weights_resumes(tmp_path):
    """The weights are the checkpoint's: a model built with another seed is the same configuration."""
    _killed_run(tmp_path, TrainConfig(**RESUME_CFG), run_config={"context": 256})
    rows = train(tiny_model("llama", seed=9), ragged_batches(seed=6), TrainConfig(**RESUME_CFG), out_dir=tmp_path,
                 use_wandb=False, progress=False, run_config={"context": 256})
    assert [r["step"] for r in rows] == list(range(1, 7))


class Killed(BaseException):
    """Stands for SIGKILL in the middle of a write (not an Exception: no handler of the code under test runs)."""


def dying_open():
    """``Path.open`` under which every text file opened for writing gets half of what it is given, then "dies"."""
    real_open = Path.open

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise Killed

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        return HalfWriter(f) if "w" in mode else f

    return open_


def test_log_rewrite_killed_midway_keeps_the_log(tmp_path, monkeypatch):
    """On resume the log is cut back to the checkpoint's step by writing a new file and renaming it: a kill during
    that rewrite leaves the whole old log, and the next resume still continues the same curve."""
    cfg = TrainConfig(**RESUME_CFG)
    _killed_run(tmp_path / "run", cfg)
    log = tmp_path / "run" / "log.jsonl"
    before = log.read_text()
    with monkeypatch.context() as m:
        m.setattr(Path, "open", dying_open())
        with pytest.raises(Killed):
            RunLog(tmp_path / "run", "run", use_wandb=False, resume_step=2)
    assert log.read_text() == before
    resumed = train(tiny_model("llama"), ragged_batches(seed=6), cfg, out_dir=tmp_path / "run", use_wandb=False,
                    progress=False)
    ref = train(tiny_model("llama"), ragged_batches(seed=6), cfg, out_dir=tmp_path / "ref", use_wandb=False,
                progress=False)
    assert _curve(resumed) == _curve(ref)


def test_truncated_last_log_line_is_dropped_on_resume(tmp_path):
    """A kill while appending a row can leave half a line; that row is after the last checkpoint anyway, so the
    resume drops it instead of failing on the broken JSON."""
    cfg = TrainConfig(**RESUME_CFG)
    _killed_run(tmp_path / "run", cfg)
    log = tmp_path / "run" / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 4, "lo')
    resumed = train(tiny_model("llama"), ragged_batches(seed=6), cfg, out_dir=tmp_path / "run", use_wandb=False,
                    progress=False)
    ref = train(tiny_model("llama"), ragged_batches(seed=6), cfg, out_dir=tmp_path / "ref", use_wandb=False,
                progress=False)
    assert _curve(resumed) == _curve(ref)


def test_damaged_log_line_before_the_end_is_an_error(tmp_path):
    """Only the last line can be cut by a kill; a broken line before it means the log is damaged: say so."""
    _killed_run(tmp_path, TrainConfig(**RESUME_CFG))
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    (tmp_path / "log.jsonl").write_text("\n".join([lines[0], lines[1][:10], lines[2]]) + "\n")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        RunLog(tmp_path, "run", use_wandb=False, resume_step=2)
