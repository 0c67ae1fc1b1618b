"""Evaluation sets for lm-eval, built only from held-out documents (never seen in training), written as jsonl.

- ``heldout_docs.jsonl`` ({"corpus", "doc_id", "text"}): the first ``docs_per_corpus`` held-out documents of each
  corpus, each cut to at most ``max_chars`` characters at a line break; scored by a ``loglikelihood_rolling`` task.
- ``next_verse.jsonl`` ({"context", "choices", "label", "ref"}): "which verse comes next?". The context is
  ``context_verses`` consecutive verses of a held-out KJV chapter, the choices are the true next verse and
  ``n_choices - 1`` verses drawn from other held-out chapters, in a seeded random order; scored by a
  ``multiple_choice`` task (chance = 1 / n_choices).

Both are deterministic functions of the Debian packages and the arguments.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..results import write_text
from .packing import HELDOUT_EVERY, split_documents
from .sources import corpus_names, kjv_verses

HELDOUT_DOCS = "heldout_docs.jsonl"
NEXT_VERSE = "next_verse.jsonl"


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    return head[:head.rfind("\n") + 1] or head


def heldout_doc_records(corpus: str = "kjv+pydocs", docs_per_corpus: int = 4, max_chars: int = 4000,
                        min_chars: int = 1000, heldout_every: int = HELDOUT_EVERY) -> list[dict]:
    """Held-out documents (at least ``min_chars`` long) of each corpus, cut to ``max_chars``."""
    records = []
    for name in corpus_names(corpus):
        docs = [d for d in split_documents(name, "heldout", heldout_every) if len(d.text) >= min_chars]
        records += [{"corpus": name, "doc_id": d.doc_id, "text": _cut(d.text, max_chars)}
                    for d in docs[:docs_per_corpus]]
    return records


def next_verse_records(n_items: int = 50, n_choices: int = 4, context_verses: int = 2, seed: int = 0,
                       heldout_every: int = HELDOUT_EVERY) -> list[dict]:
    """``n_items`` next-verse questions from held-out KJV books."""
    if n_choices < 2 or context_verses < 1:
        raise ValueError(f"need n_choices >= 2 and context_verses >= 1, got {n_choices}, {context_verses}")
    held_books = {d.doc_id for d in split_documents("kjv", "heldout", heldout_every)}
    verses = [v for v in kjv_verses() if v.book in held_books]
    k = context_verses
    # positions whose k predecessors are in the same chapter
    spots = [i for i in range(k, len(verses))
             if all((verses[j].book, verses[j].chapter) == (verses[i].book, verses[i].chapter)
                    for j in range(i - k, i))]
    rng = random.Random(seed)
    if len(spots) < n_items:
        raise ValueError(f"only {len(spots)} candidate verses, asked for {n_items}")
    records = []
    for i in sorted(rng.sample(spots, n_items)):
        true = verses[i]
        pool = [v for v in verses if (v.book, v.chapter) != (true.book, true.chapter)]
        choices = [true.text] + [v.text for v in rng.sample(pool, n_choices - 1)]
        order = list(range(n_choices))
        rng.shuffle(order)
        records.append({"context": "\n".join(v.text for v in verses[i - k:i]),
                        "choices": [choices[j] for j in order], "label": order.index(0),
                        "ref": f"{true.book}{true.chapter}:{true.verse}"})
    return records


def write_eval_tasks(out_dir: str | Path, corpus: str = "kjv+pydocs", **kwargs) -> dict[str, Path]:
    """Write both jsonl files into ``out_dir``; returns {file name: path}. ``kwargs`` go to the record builders
    (``docs_per_corpus``, ``max_chars``, ``n_items``, ``n_choices``, ``seed``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc_keys = {"docs_per_corpus", "max_chars", "min_chars", "heldout_every"}
    verse_keys = {"n_items", "n_choices", "context_verses", "seed", "heldout_every"}
    unknown = set(kwargs) - doc_keys - verse_keys
    if unknown:
        raise TypeError(f"write_eval_tasks: unknown argument(s) {sorted(unknown)}")
    sets = {HELDOUT_DOCS: heldout_doc_records(corpus, **{k: v for k, v in kwargs.items() if k in doc_keys}),
            NEXT_VERSE: next_verse_records(**{k: v for k, v in kwargs.items() if k in verse_keys})}
    paths = {}
    for name, records in sets.items():
        paths[name] = out_dir / name
        write_text(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))  # atomic
    return paths
