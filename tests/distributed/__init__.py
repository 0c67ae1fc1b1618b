"""Distributed tests. ``run_sp_worker`` starts ``sp_worker.py`` (or another worker) under ``torchrun --standalone``
(gloo, CPU); ``reference_and_copy`` and ``check_case`` are the setup and the verdict of the engine workers (ZeRO-3,
FSDP2, accelerate)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("sp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run_sp_worker(nproc: int, *worker_args: str, timeout: int = 600, worker: Path = WORKER) -> tuple[str, str]:
    """Run ``worker`` (default ``sp_worker.py``) on ``nproc`` processes; assert it exited 0; return
    (stdout, stdout + stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(worker), *worker_args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return proc.stdout, out


WHOLE_LAYER = {"mlp_chunk_tokens": 16, "norms": True, "attention": True, "attention_chunk_tokens": 16}


def reference_and_copy(options: dict | None):
    """(reference, patched copy, batch, loss): a seeded tiny Llama that has run one batch (forward + backward, its
    ``.grad`` the single-process reference), a copy with identical weights and ``mst.apply(**options)`` (or none
    for None), that batch, which every rank feeds, so a data-parallel average equals the reference, and its loss."""
    import mst
    from tests.utils import clone_model, make_input_ids, make_labels, tiny_model

    ref = tiny_model("llama")
    ids = make_input_ids(2, 61)
    batch = {"input_ids": ids, "labels": make_labels(ids, "prefix")}
    loss = ref(**batch).loss
    loss.backward()
    model = clone_model(ref)
    if options is not None:
        mst.apply(model, **options)
    return ref, model, batch, loss.detach()


def check_case(name: str, loss, grads, ref) -> None:
    """The verdict of an engine worker's case: every ``(parameter name, full gradient)`` of ``grads`` equals the
    reference model's gradient of the same position (``torch.testing.assert_close`` defaults), then rank 0 prints
    ``CASE <name> OK loss=...`` (the runner looks for that line)."""
    import torch
    import torch.distributed as dist

    for (n, grad), (_, p_ref) in zip(grads, ref.named_parameters()):
        torch.testing.assert_close(grad, p_ref.grad, msg=lambda m, n=n: f"{name}: grad of {n}: {m}")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"CASE {name} OK loss={loss.item():.6f}", flush=True)
