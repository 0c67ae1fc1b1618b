"""Deterministic train / held-out token streams and packed fixed-length sequences.

Flow:
1. ``split_documents``: a corpus's documents in canonical order; every ``heldout_every``-th one (index
   ``i % heldout_every == heldout_every - 1``) is held out. For the KJV that is Proverbs, Matthew and 1 Peter; for
   the Python docs 24 of the 497 rst files. Whole documents are held out, so no held-out text leaks into training.
2. ``token_stream``: each document tokenized and followed by EOS, concatenated; cached as ``.npy`` under
   ``$MST_CACHE/corpora/`` keyed by corpus, split, split rule and tokenizer fingerprint.
3. ``PackedDataset``: the stream cut into non-overlapping ``seq_len`` windows (the tail shorter than one window is
   dropped); item i is ``{"input_ids", "labels"}`` with labels = input ids (HF shifts inside the loss).

Several corpora (``"kjv+pydocs"``) are concatenated in the given order. The same stream serves every context length,
so runs at 1K and 4K context train on the same text, only cut differently.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .sources import cache_dir, corpus_names, documents
from .tokenizer import tokenizer_fingerprint

HELDOUT_EVERY = 20
SPLITS = ("train", "heldout")


def split_documents(corpus: str, split: str, heldout_every: int = HELDOUT_EVERY) -> list:
    """The documents of ``corpus`` in ``split`` ("train" or "heldout"), canonical order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be >= 2, got {heldout_every}")
    docs = documents(corpus)
    held = [(i % heldout_every) == heldout_every - 1 for i in range(len(docs))]
    return [d for d, h in zip(docs, held) if h == (split == "heldout")]


def _tokenize(docs: list, tok) -> np.ndarray:
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tok.name_or_path!r} has no eos_token_id to separate documents")
    ids = tok([d.text for d in docs], add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in (*doc, eos)]
    dtype = np.uint16 if len(tok) <= np.iinfo(np.uint16).max + 1 else np.int32
    return np.asarray(stream, dtype=dtype)


def token_stream(corpus: str, split: str, tok, heldout_every: int = HELDOUT_EVERY,
                 cache: Path | None = None) -> np.ndarray:
    """Token ids of ``split`` of ``corpus`` (``"kjv"``, ``"pydocs"`` or ``"kjv+pydocs"``), cached on disk."""
    cache = cache_dir() / "corpora" if cache is None else cache
    parts = []
    for name in corpus_names(corpus):
        path = cache / f"{name}-{split}-every{heldout_every}-{tokenizer_fingerprint(tok)}.npy"
        if not path.exists():
            arr = _tokenize(split_documents(name, split, heldout_every), tok)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, arr)
            tmp.replace(path)  # atomic: a concurrent reader never sees a half-written cache
        parts.append(np.load(path))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def heldout_sample(corpus: str, tok, n_tokens: int, heldout_every: int = HELDOUT_EVERY) -> np.ndarray:
    """The first ``n_tokens // k`` held-out tokens of each of the k corpora, concatenated (an evaluation set that
    weighs the corpora equally, independent of their sizes)."""
    names = corpus_names(corpus)
    share = n_tokens // len(names)
    parts = [token_stream(n, "heldout", tok, heldout_every)[:share] for n in names]
    short = [n for n, p in zip(names, parts) if len(p) < share]
    if short:
        raise ValueError(f"held-out split of {short} has fewer than {share} tokens; ask for fewer")
    return np.concatenate(parts)


class PackedDataset(torch.utils.data.Dataset):
    """Non-overlapping ``seq_len`` windows of a token stream; item = {"input_ids", "labels"} (LongTensor)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if len(tokens) < seq_len:
            raise ValueError(f"stream of {len(tokens)} tokens is shorter than one sequence of {seq_len}")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range [0, {len(self)})")
        ids = torch.from_numpy(self.tokens[i * self.seq_len:(i + 1) * self.seq_len].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


def packed_dataset(corpus: str, split: str, tok, seq_len: int, heldout_every: int = HELDOUT_EVERY) -> PackedDataset:
    """``PackedDataset`` over ``token_stream(corpus, split, tok)``."""
    return PackedDataset(token_stream(corpus, split, tok, heldout_every), seq_len)
