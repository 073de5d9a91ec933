import pytest

from tests.neon.training.corpus import make_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(tokenizer model, data prefix) of a small real corpus, built once per test session."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))
