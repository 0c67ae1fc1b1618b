"""mst.data.eval_tasks: lm-eval sets built from held-out documents only."""
import json

import pytest

from mst.data import kjv_verses, split_documents, write_eval_tasks
from mst.data.eval_tasks import heldout_doc_records, next_verse_records


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
