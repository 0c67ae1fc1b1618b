"""Dataset loaders for the Table 7 lm-eval tasks (referenced from the YAMLs as ``!function t7_data.<name>``).

lm-eval resolves ``!function`` next to the YAML, so the jsonl files are found relative to this folder whatever the
working directory. They are written by ``experiments.data.write_eval_tasks`` (``run_table7.py`` does it when missing) from
held-out documents only.
"""
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "data"


def _load(name: str) -> datasets.DatasetDict:
    path = DATA / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; write it with: python experiments/table7/run_table7.py "
                                "--parts tasks (needs scripts/get_corpora.sh)")
    return datasets.load_dataset("json", data_files={"test": str(path)})


def heldout_docs(**kwargs) -> datasets.DatasetDict:
    """Held-out documents for rolling perplexity."""
    return _load("heldout_docs.jsonl")


def next_verse(**kwargs) -> datasets.DatasetDict:
    """Next-verse multiple-choice items."""
    return _load("next_verse.jsonl")
