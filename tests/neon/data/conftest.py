from tests.data_helpers import hf_tokenizer, tiny_dataset, tiny_tokenizer  # noqa: F401
