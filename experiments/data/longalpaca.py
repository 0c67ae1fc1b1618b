"""LongAlpaca-style instruction data (the paper's Table 7 dataset) from a local file, prompt tokens masked to -100.

LongAlpaca-12k (LongLoRA, Chen et al. 2023) is not downloaded here; a user who has it points ``--data_path`` at it.
Accepted: JSON lines or one JSON list, each record with ``instruction``, optional ``input`` and ``output``. Each
example becomes the Alpaca prompt (the template LongLoRA's ``supervised-fine-tune.py`` uses) followed by the output
and EOS; labels equal the input ids on the output + EOS and ``-100`` on the prompt, so only the response is
trained. Prompt and response are tokenized separately and concatenated, so the mask boundary is exact.
Examples longer than ``max_length`` are truncated from the right (as LongLoRA does); examples whose prompt alone fills
``max_length`` have no trained token and are dropped. The held-out split is every ``heldout_every``-th record, the
same rule as for the packed corpora.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .packing import HELDOUT_EVERY, SPLITS

IGNORE_INDEX = -100
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:")


def read_records(path: str | Path) -> list[dict]:
    """Records of a ``.jsonl`` (one object per line) or ``.json`` (a list of objects) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LongAlpaca file {path} not found (it is never downloaded; pass a local "
                                ".json/.jsonl with instruction/input/output records)")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "instruction" not in rec or "output" not in rec:
            raise ValueError(f"{path}: record {i} needs 'instruction' and 'output' keys, got "
                             f"{sorted(rec) if isinstance(rec, dict) else type(rec).__name__}")
    return records


def prompt_of(record: dict) -> str:
    """The Alpaca prompt of one record (with or without its ``input``)."""
    template = PROMPT_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def encode_example(record: dict, tok, max_length: int) -> dict[str, torch.Tensor] | None:
    """{"input_ids", "labels"} of one record (prompt labels = -100), or None if no response token fits."""
    prompt = tok(prompt_of(record))["input_ids"]  # with the tokenizer's own BOS, if it adds one
    response = tok(record["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (prompt + response)[:max_length]
    if len(prompt) >= len(ids):
        return None
    labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


class LongAlpacaDataset(torch.utils.data.Dataset):
    """Tokenized LongAlpaca-style examples (variable length; batch them with ``experiments.data.pad_collate``)."""

    def __init__(self, path: str | Path, tok, max_length: int, split: str = "train",
                 heldout_every: int = HELDOUT_EVERY):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if tok.eos_token_id is None:
            raise ValueError("the tokenizer needs an eos token to end each response")
        records = [r for i, r in enumerate(read_records(path))
                   if ((i % heldout_every) == heldout_every - 1) == (split == "heldout")]
        encoded = [encode_example(r, tok, max_length) for r in records]
        self.examples = [e for e in encoded if e is not None]
        self.dropped = len(encoded) - len(self.examples)
        if not self.examples:
            raise ValueError(f"{path}: no {split} example has a response token within max_length={max_length}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.examples[i]
