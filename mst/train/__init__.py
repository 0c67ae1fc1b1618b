"""Small training utilities for the convergence experiments (Table 7).

- ``models``: Llama presets (tiny CPU model with GPT-2 vocab, Llama-3-8B), seeded or from local weights.
- ``loop``: AdamW + gradient accumulation + clipping + constant LR, exact resume (``TrainConfig``, ``train``).
- ``checkpoint``, ``run_log``: atomic checkpoints; jsonl/csv + offline wandb logs.
- ``evaluate``: held-out perplexity at a context length; lm-eval on in-memory models.
- ``budget``: the longest context each strategy fits in a memory budget (measured steps).
"""
from .budget import fit_contexts, training_step_factory
from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import heldout_perplexity, run_lm_eval, window_batches
from .loop import TrainConfig, make_optimizer, train
from .models import PRESETS, build_model
from .run_log import RunLog

__all__ = ["PRESETS", "RunLog", "TrainConfig", "build_model", "fit_contexts", "heldout_perplexity", "load_checkpoint",
           "make_optimizer", "run_lm_eval", "save_checkpoint", "train", "training_step_factory", "window_batches"]
