"""Table 7's training: the loop, its checkpoints and logs, and evaluation.

- ``loop``: AdamW + gradient accumulation + clipping + constant LR, exact resume of the same configuration only
  (``TrainConfig``, ``train``, ``ResumeMismatchError``).
- ``checkpoint``, ``run_log``: atomic checkpoints; jsonl/csv + offline wandb logs.
- ``evaluate``: held-out perplexity at a context length; lm-eval on in-memory models.
Models are ``experiments.models``'; the longest context each strategy fits is ``experiments.search.fit_contexts``.
"""
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .evaluate import heldout_perplexity, run_lm_eval, window_batches
from .loop import ResumeMismatchError, TrainConfig, make_optimizer, run_identity, train
from .run_log import RunLog

__all__ = ["ResumeMismatchError", "RunLog", "TrainConfig", "heldout_perplexity", "load_checkpoint",
           "make_optimizer", "read_checkpoint", "run_identity", "run_lm_eval", "save_checkpoint", "train",
           "window_batches"]
