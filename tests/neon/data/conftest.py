from tests.data_helpers import tiny_dataset, tiny_tokenizer  # noqa: F401
