"""experiments.data.longalpaca: LongAlpaca-style records, prompt tokens masked to -100."""
import json

import pytest

from experiments.data import LongAlpacaDataset
from experiments.data.longalpaca import IGNORE_INDEX, PROMPT_INPUT, PROMPT_NO_INPUT, encode_example, prompt_of, read_records

RECORDS = [{"instruction": "Summarize the paper.", "input": "A long paper " * 40, "output": "It is long."},
           {"instruction": "Say hi.", "output": "Hi there, friend."},
           {"instruction": "Count.", "input": "", "output": "one two three"}]


def test_prompt_templates():
    assert prompt_of(RECORDS[0]) == PROMPT_INPUT.format(instruction=RECORDS[0]["instruction"],
                                                       input=RECORDS[0]["input"])
    assert prompt_of(RECORDS[2]) == PROMPT_NO_INPUT.format(instruction="Count.")


def test_prompt_is_masked_and_response_is_trained(tok):
    ex = encode_example(RECORDS[1], tok, max_length=4096)
    n_prompt = len(tok(prompt_of(RECORDS[1]))["input_ids"])
    assert (ex["labels"][:n_prompt] == IGNORE_INDEX).all()
    assert ex["labels"][n_prompt:].tolist() == ex["input_ids"][n_prompt:].tolist()
    assert tok.decode(ex["input_ids"][n_prompt:]) == "Hi there, friend.<|endoftext|>"


def test_truncation_and_dropping(tok, tmp_path):
    full = encode_example(RECORDS[1], tok, max_length=4096)
    ex = encode_example(RECORDS[1], tok, max_length=len(full["input_ids"]) - 3)
    assert ex["input_ids"].tolist() == full["input_ids"][:-3].tolist() and (ex["labels"] != IGNORE_INDEX).any()
    assert encode_example(RECORDS[0], tok, max_length=30) is None  # prompt alone fills max_length
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 20))
    ds = LongAlpacaDataset(path, tok, max_length=60)
    assert ds.dropped == 19 and len(ds) == 38  # 57 train records (3 held out); the 19 long-prompt ones dropped


def test_json_list_and_jsonl_agree_and_split(tok, tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS * 10))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 10))
    assert read_records(tmp_path / "a.json") == read_records(tmp_path / "a.jsonl")
    train = LongAlpacaDataset(tmp_path / "a.json", tok, 4096)
    held = LongAlpacaDataset(tmp_path / "a.json", tok, 4096, split="heldout", heldout_every=10)
    assert len(train) + len(LongAlpacaDataset(tmp_path / "a.json", tok, 4096, split="heldout")) == 30
    assert len(held) == 3


def test_clear_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(ValueError, match="instruction"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "ok.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    with pytest.raises(ValueError, match="no train example"):
        LongAlpacaDataset(tmp_path / "ok.jsonl", tok, max_length=30)
    with pytest.raises(ValueError, match="split"):
        LongAlpacaDataset(tmp_path / "ok.jsonl", tok, max_length=30, split="test")
