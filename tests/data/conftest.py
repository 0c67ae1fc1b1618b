"""Fixtures for mst.data tests: the real corpora and tokenizer, skipped (with the install command) if absent."""
import pytest

from mst.data import CorpusMissingError, gpt2_tokenizer, kjv_verses
from mst.data.sources import pydocs_documents


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
