"""The configuration steps that read files: the tokenizer's vocabulary and the data files.

Both are cheap (a sentencepiece header, the .idx headers and a max over memory-mapped tokens)
and run in resolve(), after validate() and before anything expensive is built.
"""

from __future__ import annotations

from neon.training.config.sections import Config, ConfigError, padded_vocab_size


def derive_vocab_size(cfg: Config) -> None:
    """model.vocab_size from the tokenizer (padded as Megatron-LM does) unless someone set it."""
    if not cfg.data.tokenizer_model or cfg.origin("model.vocab_size") != "default":
        return
    from neon.data import DataError, tokenizer_vocab_size

    try:
        vocab = tokenizer_vocab_size(cfg.data.tokenizer_model)
    except DataError as e:
        raise ConfigError(f"--tokenizer-model: {e}") from None
    cfg.set("model.vocab_size", padded_vocab_size(cfg, vocab), "tokenizer")


def check_data(cfg: Config) -> None:
    """Every --data-path prefix exists, is complete, and has no token id >= model.vocab_size."""
    from neon.data import DataError, check_data_files

    try:
        check_data_files(cfg.data.data_path, cfg.model.vocab_size)
    except DataError as e:
        raise ConfigError(f"--data-path: {e}") from None
