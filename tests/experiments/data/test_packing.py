"""experiments.data.packing: deterministic held-out split, cached token streams, packed sequences."""
import numpy as np
import pytest
import torch

from experiments.data import PackedDataset, heldout_sample, packed_dataset, split_documents, token_stream
from experiments.data.tokenizer import tokenizer_fingerprint


def test_split_is_deterministic_and_disjoint(corpora):
    for corpus, n_held in (("kjv", 3), ("pydocs", 24)):
        train = [d.doc_id for d in split_documents(corpus, "train")]
        held = [d.doc_id for d in split_documents(corpus, "heldout")]
        assert len(held) == n_held and not set(train) & set(held)
        assert held == [d.doc_id for d in split_documents(corpus, "heldout")]
    assert [d.doc_id for d in split_documents("kjv", "heldout")] == ["Prv", "Mat", "1Pet"]


def test_split_validation():
    with pytest.raises(ValueError, match="split must be"):
        split_documents("kjv", "test")
    with pytest.raises(ValueError, match="heldout_every"):
        split_documents("kjv", "train", heldout_every=1)


def test_token_stream_is_cached_and_eos_separated(tok, corpora, tmp_path):
    first = token_stream("kjv", "heldout", tok, cache=tmp_path)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and tokenizer_fingerprint(tok) in files[0].name
    again = token_stream("kjv", "heldout", tok, cache=tmp_path)
    np.testing.assert_array_equal(first, again)
    assert first.dtype == np.uint16
    assert int((first == tok.eos_token_id).sum()) == 3  # one EOS after each held-out book
    assert first[-1] == tok.eos_token_id


def test_combined_stream_concatenates_in_order(tok, corpora):
    both = token_stream("kjv+pydocs", "heldout", tok)
    kjv, py = token_stream("kjv", "heldout", tok), token_stream("pydocs", "heldout", tok)
    np.testing.assert_array_equal(both, np.concatenate([kjv, py]))


def test_packed_dataset_windows():
    stream = np.arange(1000, dtype=np.uint16)
    ds = PackedDataset(stream, 96)
    assert len(ds) == 10
    item = ds[3]
    assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (96,)
    assert torch.equal(item["input_ids"], torch.arange(288, 384))
    assert torch.equal(item["labels"], item["input_ids"])
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(ValueError, match="shorter than one sequence"):
        PackedDataset(stream[:10], 96)
    with pytest.raises(ValueError, match="seq_len"):
        PackedDataset(stream, 1)


def test_packed_dataset_same_text_at_any_context(tok, corpora):
    short, long = packed_dataset("kjv", "heldout", tok, 256), packed_dataset("kjv", "heldout", tok, 1024)
    assert torch.equal(torch.cat([short[i]["input_ids"] for i in range(4)]), long[0]["input_ids"])


def test_heldout_sample_takes_equal_shares(tok, corpora):
    sample = heldout_sample("kjv+pydocs", tok, 2000)
    assert len(sample) == 2000
    np.testing.assert_array_equal(sample[:1000], token_stream("kjv", "heldout", tok)[:1000])
    np.testing.assert_array_equal(sample[1000:], token_stream("pydocs", "heldout", tok)[:1000])
    with pytest.raises(ValueError, match="fewer than"):
        heldout_sample("kjv", tok, 10 ** 8)
