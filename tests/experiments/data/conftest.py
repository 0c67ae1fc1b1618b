"""Fixtures for experiments.data tests: the real corpora and tokenizer, skipped (with the install command) if absent."""
import pytest

from experiments.data import CorpusMissingError, gpt2_tokenizer, kjv_verses
from experiments.data.sources import pydocs_documents


@pytest.fixture(scope="session")
def tok():
    try:
        return gpt2_tokenizer()
    except CorpusMissingError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def corpora():
    try:
        kjv_verses()
        pydocs_documents()
    except CorpusMissingError as e:
        pytest.skip(str(e))
