"""The configuration steps that read files: the tokenizer's vocabulary, the data files, and the
lm-eval task names.

All are cheap (a tokenizer file, the .idx headers and a max over memory-mapped tokens, lm-eval's
task index) and run in resolve(), after validate() and before anything expensive is built.
"""

from __future__ import annotations

from neon.training.config.sections import Config, ConfigError, padded_vocab_size


def derive_vocab_size(cfg: Config) -> None:
    """model.vocab_size from the tokenizer (padded as Megatron-LM does) unless someone set it."""
    if not cfg.data.tokenizer_model or cfg.origin("model.vocab_size") != "default":
        return
    cfg.set("model.vocab_size", padded_vocab_size(cfg, _tokenizer(cfg).vocab_size), "tokenizer")


def _tokenizer(cfg: Config):
    from neon.data import DataError, load_tokenizer

    try:
        return load_tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
    except DataError as e:
        raise ConfigError(f"--tokenizer-model: {e}") from None


def check_data(cfg: Config) -> None:
    """Every prefix of --data-path (or of each per-split path) exists, is complete, and has no
    token id >= model.vocab_size."""
    from neon.data import DataError, check_data_files

    d = cfg.data
    if d.tokenizer_model:  # readable, and of --tokenizer-type (with --vocab-size set, not read before)
        _tokenizer(cfg)
    for flag, path in (("--data-path", d.data_path), ("--train-data-path", d.train_data_path),
                       ("--valid-data-path", d.valid_data_path), ("--test-data-path", d.test_data_path)):
        if not path:
            continue
        try:
            check_data_files(path, cfg.model.vocab_size)
        except DataError as e:
            raise ConfigError(f"{flag}: {e}") from None


def check_eval_tasks(cfg: Config) -> None:
    """Every --eval-tasks name is a task lm-eval knows (its registry, --eval-tasks-include-path)."""
    s = cfg.schedule
    if not s.eval_tasks:
        return
    from neon.evaluation.tasks import check_tasks

    check_tasks(s.eval_tasks, s.eval_tasks_include_path)
