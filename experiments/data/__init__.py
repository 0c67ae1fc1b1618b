"""Offline long-sequence training data for MsT experiments.

- ``sources``: real text from Debian packages (King James Bible, Python 3.11 docs), as documents.
- ``tokenizer``: the real GPT-2 BPE built offline from ``gpt2.tiktoken`` (or a local HF tokenizer).
- ``packing``: deterministic train / held-out split, cached token streams, packed fixed-length sequences.
- ``batches``: a stateless seeded micro-batch schedule (exact resume) and padding collate.
- ``longalpaca``: LongAlpaca-style instruction jsonl with prompt tokens masked to -100.
- ``eval_tasks``: held-out documents and a next-verse multiple-choice set for lm-eval.
Install the corpora and tokenizer with ``bash scripts/get_corpora.sh``.
"""
from .batches import MicroBatches, pad_collate
from .eval_tasks import write_eval_tasks
from .longalpaca import LongAlpacaDataset
from .packing import PackedDataset, heldout_sample, packed_dataset, split_documents, token_stream
from .sources import CorpusMissingError, cache_dir, documents, kjv_verses
from .tokenizer import gpt2_tokenizer, load_tokenizer

__all__ = ["CorpusMissingError", "LongAlpacaDataset", "MicroBatches", "PackedDataset", "cache_dir", "documents",
           "gpt2_tokenizer", "heldout_sample", "kjv_verses", "load_tokenizer", "pad_collate", "packed_dataset",
           "split_documents", "token_stream", "write_eval_tasks"]
