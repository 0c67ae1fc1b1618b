"""``python -m experiments.data prepare [--corpus kjv+pydocs] [--tokenizer gpt2]``: tokenize and cache both splits, print
their sizes (called by ``scripts/get_corpora.sh``)."""
from __future__ import annotations

import argparse
import time

from .packing import SPLITS, split_documents, token_stream
from .sources import corpus_names
from .tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.data")
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--corpus", default="kjv+pydocs")
    parser.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a local HF model directory")
    args = parser.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    for name in corpus_names(args.corpus):
        for split in SPLITS:
            t0 = time.perf_counter()
            n_docs = len(split_documents(name, split))
            n_tok = len(token_stream(name, split, tok))
            print(f"[experiments.data] {name:7s} {split:8s} {n_docs:4d} documents {n_tok:>10,d} tokens "
                  f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
