"""experiments.data.sources: the Debian corpora as documents, and the message when a package is missing."""
import pytest

from experiments.data import sources
from experiments.data.sources import CorpusMissingError, corpus_names, documents, kjv_documents, kjv_verses


def test_kjv_verses_are_the_whole_bible(corpora):
    verses = kjv_verses()
    assert len(verses) == 31102
    assert (verses[0].book, verses[0].chapter, verses[0].verse) == ("Ge", 1, 1)
    assert verses[0].text == "In the beginning God created the heaven and the earth."
    assert (verses[-1].book, verses[-1].chapter, verses[-1].verse) == ("Rev", 22, 21)


def test_kjv_documents_one_per_book_without_references(corpora):
    docs = kjv_documents()
    assert len(docs) == 66 and docs[0].doc_id == "Ge" and docs[-1].doc_id == "Rev"
    assert docs[0].text.startswith("In the beginning God created")
    assert "Ge1:1" not in docs[0].text


def test_pydocs_documents_sorted_rst_sources(corpora):
    docs = documents("pydocs")
    assert len(docs) == 497
    ids = [d.doc_id for d in docs]
    assert ids == sorted(ids) and all(i.endswith(".rst.txt") for i in ids)


def test_missing_bible_names_the_install_command(monkeypatch):
    sources.kjv_verses.cache_clear()
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    with pytest.raises(CorpusMissingError, match="scripts/get_corpora.sh.*bible-kjv"):
        kjv_verses()
    sources.kjv_verses.cache_clear()


def test_missing_pydocs_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "PYDOCS_DIR", tmp_path / "nothing")
    with pytest.raises(CorpusMissingError, match="scripts/get_corpora.sh.*python3.11-doc"):
        documents("pydocs")


def test_corpus_names_validation():
    assert corpus_names("kjv+pydocs") == ["kjv", "pydocs"]
    with pytest.raises(ValueError, match="unknown corpus"):
        corpus_names("kjv+gutenberg")
    with pytest.raises(ValueError, match="unknown corpus"):
        documents("kjv+pydocs")
