"""experiments.data.tokenizer: the real GPT-2 BPE, offline, as an HF tokenizer equal to tiktoken."""
import pytest

from experiments.data import tokenizer as tokmod
from experiments.data.sources import CorpusMissingError, documents


def test_canonical_gpt2_ids(tok):
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == 50257
    assert tok.eos_token_id == tok.pad_token_id == 50256
    assert tok("<|endoftext|>")["input_ids"] == [50256]


def test_hf_tokenizer_equals_tiktoken_on_real_text(tok, corpora):
    enc = tokmod.gpt2_tiktoken()
    texts = [documents("pydocs")[3].text, documents("kjv")[1].text[:20000], "  tabs\tand  \n\n spaces 123456 ünï"]
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == enc.encode_ordinary(text)


def test_missing_tiktoken_file_names_the_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MST_CACHE", str(tmp_path))
    monkeypatch.setattr(tokmod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CorpusMissingError, match="gpt2.tiktoken.*scripts/get_corpora.sh"):
        tokmod.gpt2_tiktoken_path()


def test_corrupt_tiktoken_file_is_rejected(monkeypatch, tmp_path):
    (tmp_path / "tokenizers").mkdir()
    (tmp_path / "tokenizers" / "gpt2.tiktoken").write_text("not the real file")
    monkeypatch.setenv("MST_CACHE", str(tmp_path))
    with pytest.raises(CorpusMissingError, match="sha256"):
        tokmod.gpt2_tiktoken_path()


def test_load_tokenizer_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        tokmod.load_tokenizer("meta-llama/Meta-Llama-3-8B")


def test_load_tokenizer_from_local_directory(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    local = tokmod.load_tokenizer(str(tmp_path))
    assert local("Hello world")["input_ids"] == [15496, 995]
    assert tokmod.tokenizer_fingerprint(local) == tokmod.tokenizer_fingerprint(tok)
