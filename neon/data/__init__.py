"""Neon's data pipeline: tokenizer, .bin/.idx preprocessing, megatron-core datasets, demo corpus.

    from neon.data import load_tokenizer, tokenizer_vocab_size, build_datasets, check_data_files, DataError
    from neon.data.corpus import build_demo_corpus, prepare_demo_data

Names load lazily, so the tokenizer tools start without importing megatron-core.
"""

import importlib

_EXPORTS = {
    "DataError": "neon.data.errors",
    "NeonTokenizer": "neon.data.tokenizer",
    "HFTokenizer": "neon.data.tokenizer",
    "load_tokenizer": "neon.data.tokenizer",
    "tokenizer_vocab_size": "neon.data.tokenizer",
    "build_datasets": "neon.data.datasets",
    "build_split_datasets": "neon.data.datasets",
    "DataFileInfo": "neon.data.checks",
    "check_data_file": "neon.data.checks",
    "check_data_files": "neon.data.checks",
    "parse_data_path": "neon.data.checks",
    "build_demo_corpus": "neon.data.corpus",
    "prepare_demo_data": "neon.data.corpus",
    "preprocess": "neon.data.preprocess",
    "train_tokenizer": "neon.data.tokenizer_training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neon.data' has no attribute {name!r}")
