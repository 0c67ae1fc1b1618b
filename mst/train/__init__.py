"""Small training utilities for the convergence experiments (Table 7).

- ``models``: Llama presets (tiny CPU model with GPT-2 vocab, Llama-3-8B), seeded or from local weights.
- ``loop``: AdamW + gradient accumulation + clipping + constant LR, exact resume of the same configuration only
  (``TrainConfig``, ``train``, ``ResumeMismatchError``).
- ``checkpoint``, ``run_log``: atomic checkpoints; jsonl/csv + offline wandb logs.
- ``evaluate``: held-out perplexity at a context length; lm-eval on in-memory models.
- ``budget``: the longest context each strategy fits in a memory budget (measured steps).
"""
from .budget import fit_contexts, training_step_factory
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .evaluate import heldout_perplexity, run_lm_eval, window_batches
from .loop import ResumeMismatchError, TrainConfig, make_optimizer, run_identity, train
from .models import PRESETS, build_model
from .run_log import RunLog

__all__ = ["PRESETS", "ResumeMismatchError", "RunLog", "TrainConfig", "build_model", "fit_contexts",
           "heldout_perplexity", "load_checkpoint", "make_optimizer", "read_checkpoint", "run_identity",
           "run_lm_eval", "save_checkpoint", "train", "training_step_factory", "window_batches"]
