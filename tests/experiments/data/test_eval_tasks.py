"""experiments.data.eval_tasks: lm-eval sets built from held-out documents only."""
import json

import pytest

from experiments.data import kjv_verses, split_documents, write_eval_tasks
from experiments.data.eval_tasks import heldout_doc_records, next_verse_records


def test_next_verse_items(corpora):
    items = next_verse_records(n_items=20, n_choices=4, seed=3)
    assert items == next_verse_records(n_items=20, n_choices=4, seed=3)
    held_books = {d.doc_id for d in split_documents("kjv", "heldout")}
    by_ref = {f"{v.book}{v.chapter}:{v.verse}": v for v in kjv_verses()}
    for item in items:
        true = by_ref[item["ref"]]
        assert true.book in held_books
        assert item["choices"][item["label"]] == true.text
        assert len(item["choices"]) == 4 and 0 <= item["label"] < 4
        prev = by_ref[f"{true.book}{true.chapter}:{true.verse - 1}"]
        assert item["context"].endswith(prev.text)
    assert len({i["label"] for i in items}) > 1  # the answer position varies
    with pytest.raises(ValueError, match="n_choices"):
        next_verse_records(n_choices=1)


def test_heldout_doc_records(corpora):
    recs = heldout_doc_records("kjv+pydocs", docs_per_corpus=2, max_chars=500)
    assert [r["corpus"] for r in recs] == ["kjv", "kjv", "pydocs", "pydocs"]
    held = {d.doc_id for c in ("kjv", "pydocs") for d in split_documents(c, "heldout")}
    assert all(r["doc_id"] in held and 0 < len(r["text"]) <= 500 for r in recs)


def test_write_eval_tasks(corpora, tmp_path):
    paths = write_eval_tasks(tmp_path, corpus="kjv", n_items=5, docs_per_corpus=1)
    lines = paths["next_verse.jsonl"].read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["choices"]
    assert len(paths["heldout_docs.jsonl"].read_text().splitlines()) == 1
    with pytest.raises(TypeError, match="unknown"):
        write_eval_tasks(tmp_path, n_itmes=5)


def test_write_eval_tasks_replaces_files_atomically(tmp_path, monkeypatch):
    """A write that fails half way (disk full, a kill) leaves the previous files whole and no temporary file."""
    import pathlib

    import experiments.data.eval_tasks as eval_tasks

    records = {"docs": [{"corpus": "kjv", "doc_id": "Gen", "text": "In the beginning"}],
               "verses": [{"context": "a", "choices": ["b", "c"], "label": 0, "ref": "Gen1:2"}]}
    monkeypatch.setattr(eval_tasks, "heldout_doc_records", lambda corpus, **kw: records["docs"])
    monkeypatch.setattr(eval_tasks, "next_verse_records", lambda **kw: records["verses"])
    paths = write_eval_tasks(tmp_path, corpus="kjv")
    before = {name: path.read_text() for name, path in paths.items()}
    assert json.loads(before["next_verse.jsonl"]) == records["verses"][0]

    records["docs"] = records["docs"] * 50
    real_write_text = pathlib.Path.write_text

    def half_then_fail(self, text, *args, **kwargs):
        real_write_text(self, text[:len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        write_eval_tasks(tmp_path, corpus="kjv")
    monkeypatch.undo()
    assert {name: path.read_text() for name, path in paths.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no temporary file left
