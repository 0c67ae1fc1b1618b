"""torchrun worker for tests/distributed/test_engines_torchrun.py: mst trained through accelerate's DDP equals
one plain process.

    torchrun --standalone --nproc_per_node 2 tests/distributed/accelerate_worker.py

Every rank builds the same seeded tiny Llama (fp32) and computes the unpatched model's loss and gradients on one batch
itself; a patched copy goes through ``Accelerator().prepare`` (DDP over gloo on CPU, with an AdamW optimizer) and
runs the same batches on every rank inside ``accelerator.accumulate`` (two micro-batches: the first without DDP's
all-reduce, the second with it) with ``accelerator.backward``, so the all-reduced average is the single-process
gradient of the window. Loss and
every gradient must equal the reference (``torch.testing.assert_close`` defaults). Rank 0 prints
``CASE <name> OK loss=...`` per case.
"""
from __future__ import annotations

import torch
from accelerate import Accelerator

import mst
from tests.distributed import WHOLE_LAYER, check_case
from tests.utils import clone_model, make_input_ids, make_labels, tiny_model

CASES = {"vanilla": None, "mst": {"mlp_chunk_tokens": 16}, "mst_whole_layer": WHOLE_LAYER}


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        ids = make_input_ids(2, 61 - 4 * i, seed=20 + i)
        out.append({"input_ids": ids, "labels": make_labels(ids, "prefix")})
    return out


STEPS = 2  # micro-batches of one accumulation window (Accelerator's gradient_accumulation_steps)


def run_case(accelerator: Accelerator, name: str, options: dict | None, steps: int = STEPS) -> None:
    ref = tiny_model("llama")
    data = batches(steps)
    expected = [ref(**b).loss / steps for b in data]
    for loss in expected:
        loss.backward()
    model = clone_model(ref)
    if options is not None:
        mst.apply(model, **options)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.0))
    for b, loss_ref in zip(data, expected):
        with accelerator.accumulate(model):
            loss = model(**b).loss
            accelerator.backward(loss)
            torch.testing.assert_close(loss.detach() / steps, loss_ref.detach())
    check_case(name, loss, ((n, p.grad) for n, p in accelerator.unwrap_model(model).named_parameters()), ref)
    optimizer.zero_grad()


def main() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=STEPS)
    for name, options in CASES.items():
        run_case(accelerator, name, options)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
