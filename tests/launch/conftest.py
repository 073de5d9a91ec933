import pytest

from tests.launch import training


@pytest.fixture(scope="session")
def launch_corpus(tmp_path_factory):
    """(tokenizer model, data prefix) of the small real test corpus, built once per session."""
    return training.make_corpus(tmp_path_factory.mktemp("launch_corpus"))
