"""mst under TRL (1.16): the SFTTrainer installs its own fused LM head on the model instance (``add_fused_lm_head``:
``model(..., fused_lm_head=True)`` returns per-token log-probs, entropy and top-1 flags without S x V logits).

``mst.apply`` keeps that instance forward (``_Patch.inner``): a call with TRL's own argument runs TRL's head (our MLP
mini-sequences and checkpointing still apply inside), any other call runs mst's chunked loss or, without labels,
the normal forward; ``mst.revert`` puts TRL's forward back. Applied after the trainer is built (the order in which
``trainer.train()`` failed before: ``'CausalLMOutputWithPast' object has no attribute 'log_probs'``) or before it.
"""
from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import add_fused_lm_head

import mst
from tests.utils import VOCAB, assert_exact, assert_same_step, clone_model, make_input_ids, make_labels, tiny_model

TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks its fused head for


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary (built in memory: nothing from a hub)."""
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", bos_token="t1", eos_token="t2",
                                   unk_token="t3")


def test_fused_head_kept_and_exact():
    ref = tiny_model("llama")
    got = clone_model(ref)
    for model in (ref, got):
        add_fused_lm_head(model, outputs=TRL_OUTPUTS)
    trl_forward = got.forward
    mst.apply(got, mlp_chunk_tokens=16)
    ids = make_input_ids(2, 40)
    labels = make_labels(ids, "prefix")
    assert_same_step(ref, got, input_ids=ids, labels=labels, fused_lm_head=True)  # TRL's head, mst's layers
    out = got(input_ids=ids, labels=labels, fused_lm_head=True)
    assert out.log_probs.shape == (2, 39) and out.is_top1 is not None  # one per token with a successor
    ref.zero_grad()
    got.zero_grad()
    assert_same_step(ref, got, input_ids=ids, labels=labels)  # mst's chunked loss
    assert got(input_ids=ids, labels=labels).logits is None
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=ids).logits, ref(input_ids=ids).logits)
    mst.revert(got)
    assert got.forward == trl_forward


def sft_step(model, out_dir, apply_after: bool) -> dict[str, torch.Tensor]:
    """One real SFTTrainer optimizer step (SGD: linear in the gradient, so fp32 rounding stays ~1e-7), in fp32:
    SFTConfig's default bf16=True would run CPU autocast, where chunked and whole matmuls round differently."""
    args = SFTConfig(output_dir=str(out_dir), bf16=False, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     max_steps=1, optim="sgd", learning_rate=0.5, seed=0, use_cpu=True, report_to="none",
                     save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                     gradient_checkpointing=False)
    dataset = Dataset.from_dict({"input_ids": make_input_ids(4, 40, seed=3).tolist()})
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer())
    if apply_after:
        mst.apply(trainer.model, mlp_chunk_tokens=16)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("apply_after", [True, False], ids=["apply_after_trainer", "apply_before_trainer"])
def test_sft_trainer_step_matches_unpatched(apply_after, tmp_path):
    ref = tiny_model("llama")
    got = clone_model(ref)
    if not apply_after:
        mst.apply(got, mlp_chunk_tokens=16)
    expected = sft_step(ref, tmp_path / "ref", apply_after=False)
    trained = sft_step(got, tmp_path / "mst", apply_after=apply_after)
    initial = {n: p.detach() for n, p in tiny_model("llama").named_parameters()}  # same seed: the start weights
    assert any(not torch.equal(expected[n], initial[n]) for n in initial), "the step did not move the weights"
    for name, value in expected.items():
        assert_exact(trained[name], value, name)
