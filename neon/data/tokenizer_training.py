"""Training a sentencepiece model (BPE with byte fallback by default) from text or JSONL files.

The settings keep text recoverable exactly (identity normalisation, whitespace kept, unknown
characters fall back to bytes), so decode(encode(text)) == text for any UTF-8 text.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from neon.data.documents import expand_inputs, iter_documents
from neon.data.errors import DataError

SPECIAL_IDS = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3)
MODEL_TYPES = ("bpe", "unigram", "char", "word")
MAX_SENTENCE_BYTES = 16384


def _sentences(docs: Iterator[str]) -> Iterator[str]:
    """sentencepiece learns from lines; newlines themselves are covered by byte fallback."""
    for doc in docs:
        for line in doc.split("\n"):
            if line.strip():
                # sentencepiece skips over-long sentences; cut them instead of losing them
                for i in range(0, len(line), MAX_SENTENCE_BYTES // 4):
                    yield line[i:i + MAX_SENTENCE_BYTES // 4]


def train_tokenizer(inputs: list[str] | str, model_prefix: str | Path, vocab_size: int = 32000,
                    model_type: str = "bpe", json_key: str | list[str] = "text", input_format: str = "auto",
                    text_unit: str = "line", byte_fallback: bool = True, character_coverage: float = 0.9995,
                    input_sentence_size: int = 0, num_threads: int | None = None, seed: int = 1234,
                    show_progress: bool = True, verbose: bool = False) -> Path:
    """Train `model_prefix`.model (+ .vocab) and return the .model path.

    Special ids: unk=0, bos=1, eos=2 (= end of document), pad=3. `input_sentence_size` > 0
    samples that many lines (seeded) from big corpora; 0 uses every line.
    """
    if model_type not in MODEL_TYPES:
        raise DataError(f"--model-type {model_type!r} is unknown; use one of {MODEL_TYPES}.")
    min_vocab = len(SPECIAL_IDS) + (256 if byte_fallback else 0) + 1
    if vocab_size < min_vocab:
        raise DataError(f"--vocab-size {vocab_size} is too small: the special tokens"
                        f"{' and the 256 byte-fallback pieces' if byte_fallback else ''} alone need {min_vocab - 1}; "
                        f"use at least {min_vocab + 64}.")
    files = expand_inputs(inputs)
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)

    docs = iter_documents(files, json_key=json_key, input_format=input_format, text_unit=text_unit)
    sentences = _sentences(docs)
    if show_progress:
        sentences = tqdm(sentences, desc="reading lines for the tokenizer", unit=" lines", mininterval=1.0)

    spm.set_random_generator_seed(seed)
    kwargs = dict(
        model_prefix=str(model_prefix), vocab_size=vocab_size, model_type=model_type,
        byte_fallback=byte_fallback, character_coverage=character_coverage,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=MAX_SENTENCE_BYTES, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=input_sentence_size > 0,
        num_threads=num_threads or min(16, os.cpu_count() or 1),
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        minloglevel=0 if verbose else 1, **SPECIAL_IDS,
    )
    if show_progress:
        print(f"training a {vocab_size}-piece {model_type} model with sentencepiece after reading the lines"
              f"{'' if verbose else ' (--verbose shows its merge log)'}", flush=True)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), **kwargs)
    except RuntimeError as err:
        msg = str(err)
        where = [str(f) for f in files]
        if "smaller than required_chars" in msg:
            raise DataError(f"--vocab-size {vocab_size} is too small for the characters of {where} ({msg}); "
                            f"raise --vocab-size or lower --character-coverage.") from err
        if "too high" in msg.lower() or "vocab_size" in msg:
            raise DataError(f"sentencepiece cannot make {vocab_size} pieces from {where} ({msg}); "
                            f"lower --vocab-size or give more text.") from err
        raise
    model = model_prefix.with_name(model_prefix.name + ".model")
    if show_progress:
        print(f"wrote {model} (vocab_size={vocab_size}, {model_type}, byte_fallback={byte_fallback})", flush=True)
    return model
