"""Real text that is available offline, as documents: the King James Bible and the Python 3.11 documentation.

Both come from Debian packages (installed by ``scripts/get_corpora.sh``), so every machine that ran that script
reads byte-identical text with no network:
- ``kjv``: packages ``bible-kjv`` + ``bible-kjv-text``; the ``bible`` program prints all 31,102 verses, one per line
  as ``<Book><chapter>:<verse> <text>``. One document per book (66), verses joined by newlines, references dropped.
- ``pydocs``: package ``python3.11-doc``; the 497 reStructuredText sources ``html/_sources/**/*.rst.txt``, one
  document per file, in sorted path order.

The document order is canonical (book order, sorted paths), which is what makes the held-out split in
``experiments.data.packing`` deterministic.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
GET_CORPORA = "bash scripts/get_corpora.sh"
PYDOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
KJV_RANGE = "Gen1:1-Rev22:21"
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


class CorpusMissingError(FileNotFoundError):
    """A corpus package or the tokenizer file is not installed; the message names the command that installs it."""


def cache_dir() -> Path:
    """Where tokenizer files and token caches live: ``$MST_CACHE`` or ``<repo>/.cache`` (git-ignored)."""
    return Path(os.environ.get("MST_CACHE", REPO_ROOT / ".cache"))


@dataclass(frozen=True)
class Verse:
    """One KJV verse; ``book`` is the ``bible`` program's abbreviation (Ge, Exo, ..., Rev)."""

    book: str
    chapter: int
    verse: int
    text: str


@dataclass(frozen=True)
class Document:
    """One document of a corpus; ``doc_id`` is stable across machines (book name or rst path)."""

    corpus: str
    doc_id: str
    text: str


@lru_cache(maxsize=1)
def kjv_verses() -> tuple[Verse, ...]:
    """All KJV verses in canonical order (Genesis 1:1 ... Revelation 22:21)."""
    exe = shutil.which("bible")
    if exe is None or not Path("/usr/lib/bible.data").exists():
        raise CorpusMissingError("King James Bible not found (Debian packages bible-kjv + bible-kjv-text). "
                                 f"Install with: {GET_CORPORA}  (or: apt-get install bible-kjv bible-kjv-text)")
    out = subprocess.run([exe, "-f", KJV_RANGE], check=True, capture_output=True, text=True).stdout
    verses = []
    for line in out.splitlines():
        m = _VERSE.match(line)
        if m is None:
            raise ValueError(f"unexpected line from `bible -f {KJV_RANGE}`: {line[:80]!r}")
        verses.append(Verse(m.group(1), int(m.group(2)), int(m.group(3)), m.group(4).strip()))
    return tuple(verses)


def kjv_documents() -> list[Document]:
    """One document per book of the KJV, verses separated by newlines."""
    books: dict[str, list[str]] = {}
    for v in kjv_verses():
        books.setdefault(v.book, []).append(v.text)
    return [Document("kjv", book, "\n".join(lines) + "\n") for book, lines in books.items()]


def pydocs_documents() -> list[Document]:
    """One document per reStructuredText source of the Python 3.11 documentation, sorted by path."""
    files = sorted(PYDOCS_DIR.rglob("*.rst.txt")) if PYDOCS_DIR.is_dir() else []
    if not files:
        raise CorpusMissingError(f"Python 3.11 documentation sources not found under {PYDOCS_DIR} (Debian package "
                                 f"python3.11-doc). Install with: {GET_CORPORA}  (or: apt-get install python3.11-doc)")
    return [Document("pydocs", str(f.relative_to(PYDOCS_DIR)), f.read_text(encoding="utf-8")) for f in files]


CORPORA = {"kjv": kjv_documents, "pydocs": pydocs_documents}


def corpus_names(spec: str) -> list[str]:
    """``"kjv+pydocs"`` -> ``["kjv", "pydocs"]``, validated."""
    names = [n.strip() for n in spec.split("+") if n.strip()]
    unknown = [n for n in names if n not in CORPORA]
    if not names or unknown:
        raise ValueError(f"unknown corpus {spec!r}: use one or more of {sorted(CORPORA)} joined by '+'")
    return names


def documents(name: str) -> list[Document]:
    """Documents of one corpus (``kjv`` or ``pydocs``) in canonical order."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}: use one of {sorted(CORPORA)}")
    return CORPORA[name]()
