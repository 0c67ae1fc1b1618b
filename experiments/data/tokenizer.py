"""The real GPT-2 BPE (50,257 tokens), built offline from ``gpt2.tiktoken`` with tiktoken's ranks.

``tiktoken.get_encoding("gpt2")`` would download its file, so instead ``scripts/get_corpora.sh`` extracts
``whisper/assets/gpt2.tiktoken`` (the same ranks, shipped in the openai-whisper sdist) into
``$MST_CACHE/tokenizers/``. From it we build a Hugging Face ``PreTrainedTokenizerFast`` (transformers'
``TikTokenConverter``), because lm-eval's ``HFLM`` and the LongAlpaca loader want an HF tokenizer; the tests check it
agrees with a plain ``tiktoken.Encoding`` over the same file and gives GPT-2's canonical ids ("Hello world" ->
[15496, 995]). Any other HF tokenizer (e.g. Llama-3's, for ``--weights``) loads from a local path only.
"""
from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

from .sources import GET_CORPORA, CorpusMissingError, cache_dir

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOS = "<|endoftext|>"
GPT2_VOCAB = 50257
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def gpt2_tiktoken_path() -> Path:
    """The verified ``gpt2.tiktoken``: from the cache, else from an installed ``whisper`` package; else an error
    naming the command that fetches it."""
    candidates = [cache_dir() / "tokenizers" / "gpt2.tiktoken"]
    spec = importlib.util.find_spec("whisper")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(spec.submodule_search_locations[0]) / "assets" / "gpt2.tiktoken")
    for path in candidates:
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != GPT2_TIKTOKEN_SHA256:
                raise CorpusMissingError(f"{path} has sha256 {digest}, expected {GPT2_TIKTOKEN_SHA256}; delete it "
                                         f"and run: {GET_CORPORA}")
            return path
    raise CorpusMissingError(f"GPT-2 BPE file gpt2.tiktoken not found (looked in {', '.join(map(str, candidates))}). "
                             f"Fetch it with: {GET_CORPORA}")


def gpt2_tiktoken():
    """A plain ``tiktoken.Encoding`` for GPT-2 over the offline file (reference for the HF tokenizer)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, explicit_n_vocab=GPT2_VOCAB,
                             mergeable_ranks=load_tiktoken_bpe(str(gpt2_tiktoken_path())),
                             special_tokens={GPT2_EOS: GPT2_VOCAB - 1})


@lru_cache(maxsize=1)
def gpt2_tokenizer():
    """GPT-2 BPE as an HF ``PreTrainedTokenizerFast`` (bos = eos = pad = ``<|endoftext|>``, id 50256)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(gpt2_tiktoken_path()), pattern=GPT2_PATTERN,
                                additional_special_tokens=[GPT2_EOS]).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=GPT2_EOS, eos_token=GPT2_EOS,
                                  pad_token=GPT2_EOS, model_max_length=10 ** 9)
    tok.name_or_path = "gpt2-bpe-offline"
    return tok


def load_tokenizer(name_or_path: str = "gpt2"):
    """``"gpt2"`` -> the offline GPT-2 BPE; anything else -> ``AutoTokenizer`` from a local directory only."""
    if name_or_path == "gpt2":
        return gpt2_tokenizer()
    from transformers import AutoTokenizer

    if not Path(name_or_path).is_dir():
        raise FileNotFoundError(f"tokenizer {name_or_path!r}: expected 'gpt2' or a local model directory "
                                "(nothing is downloaded)")
    tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    tok.model_max_length = 10 ** 9  # documents are packed, never truncated by the tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_fingerprint(tok) -> str:
    """A short hash of the tokenizer's full definition, so token caches never mix tokenizers."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:12]
