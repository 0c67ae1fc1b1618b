"""mst.apply under the HF ``Trainer`` with gradient accumulation: the trained weights equal those of an
unpatched Trainer run (fp32). This covers Trainer's ``num_items_in_batch`` loss normalisation, its gradient
accumulation without zeroing between micro-steps (where the official code's lm_head gradient blew up,
docs/paper.md §5.2 item 2) and global-norm clipping.

The optimizer is SGD: its update is linear in the gradient, so fp32 rounding differences stay ~1e-7. Adam's update
m / (sqrt(v) + eps) is ~sign(g) on elements whose gradient is near zero, which turns a 1e-9 difference in such a
gradient into an update difference of order lr (measured: 1.2e-5 on one of 512 elements after 3 AdamW steps)."""
from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

import mst
from tests.utils import assert_exact, clone_model, make_input_ids, make_labels, tiny_model

STEPS, BATCH, ACCUM, SEQ = 3, 2, 2, 48


def dataset() -> list[dict[str, torch.Tensor]]:
    """STEPS x BATCH x ACCUM examples with SFT-style ignored prefixes of different lengths, so micro-batches hold
    different numbers of valid tokens (exercising the window-wide normalisation)."""
    ids = make_input_ids(STEPS * BATCH * ACCUM, SEQ, seed=3)
    labels = make_labels(ids, "prefix")
    return [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]


def train(model, out_dir, checkpointing: bool = False) -> dict[str, torch.Tensor]:
    args = TrainingArguments(gradient_checkpointing=checkpointing,
        output_dir=str(out_dir), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
        max_steps=STEPS, optim="sgd", learning_rate=0.5, max_grad_norm=1.0, seed=0, data_seed=0, use_cpu=True,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), data_collator=default_data_collator)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_trainer_with_gradient_accumulation_matches_unpatched(model_type, tmp_path):
    ref = tiny_model(model_type)
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=16)
    initial = {n: p.detach().clone() for n, p in ref.named_parameters()}
    expected = train(ref, tmp_path / "ref")
    trained = train(got, tmp_path / "mst")
    assert any(not torch.equal(expected[n], initial[n]) for n in initial), "training did not move the weights"
    for name, value in expected.items():
        assert_exact(trained[name], value, name)


def test_trainer_checkpointing_keeps_mst_offload(tmp_path):
    """TrainingArguments(gradient_checkpointing=True) makes the Trainer call gradient_checkpointing_enable at train
    start; mst's offloading checkpoint stays in place and training is still exact."""
    from mst.integrations.offload import OffloadingCheckpoint

    ref = tiny_model("llama")
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=16, offload_checkpoints=True)
    expected = train(ref, tmp_path / "ref", checkpointing=True)
    trained = train(got, tmp_path / "mst", checkpointing=True)
    assert all(isinstance(m._gradient_checkpointing_func, OffloadingCheckpoint)
               for m in got.modules() if hasattr(m, "_gradient_checkpointing_func"))
    for name, value in expected.items():
        assert_exact(trained[name], value, name)



def accuracy(pred) -> dict[str, float]:
    """Next-token accuracy from the logits (predictions[:, :-1] against labels[:, 1:]), as a compute_metrics."""
    predicted = torch.as_tensor(pred.predictions).argmax(-1)[:, :-1]
    labels = torch.as_tensor(pred.label_ids)[:, 1:]
    valid = labels != -100
    return {"accuracy": ((predicted == labels) & valid).sum().item() / valid.sum().item()}


def evaluate(model, out_dir) -> dict[str, float]:
    args = TrainingArguments(output_dir=str(out_dir), per_device_eval_batch_size=BATCH, use_cpu=True,
                             report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, eval_dataset=dataset(), data_collator=default_data_collator,
                      compute_metrics=accuracy)
    return trainer.evaluate()


def test_eval_logits_give_compute_metrics_its_logits(tmp_path):
    """mst.apply(eval_logits=True): Trainer.evaluate (no grad) runs the unpatched forward, so compute_metrics gets
    the logits and the metrics and loss equal the unpatched model's; training still runs mst's chunked loss."""
    ref = tiny_model("llama")
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=16, eval_logits=True)
    expected, metrics = evaluate(ref, tmp_path / "ref"), evaluate(got, tmp_path / "mst")
    assert metrics["eval_accuracy"] == expected["eval_accuracy"]
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    ids = make_input_ids(2, 40)
    assert got.train()(input_ids=ids, labels=ids).logits is None  # with gradients: mst's chunked loss
