#!/usr/bin/env python
r"""Train a sentencepiece tokenizer (BPE with byte fallback by default) from text or JSONL files.

    python tools/train_tokenizer.py --input corpus.jsonl --json-keys text \
        --output-prefix tokenizers/neon --vocab-size 32000

writes tokenizers/neon.model (pass it as --tokenizer-model) and tokenizers/neon.vocab.
Special ids: unk=0, bos=1, eos=2 (the end-of-document token), pad=3.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from neon.data.documents import TEXT_UNITS  # noqa: E402
from neon.data.tokenizer import NeonTokenizer  # noqa: E402
from neon.data.tokenizer_training import MODEL_TYPES, train_tokenizer  # noqa: E402
from neon.errors import NeonError  # noqa: E402


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="text or JSONL files (globs allowed)")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSONL keys whose text is used (all of them feed the tokenizer)")
    p.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                   help="auto: .jsonl/.json/.ndjson files are JSONL, others plain text")
    p.add_argument("--text-unit", choices=TEXT_UNITS, default="line",
                   help="what one document of a plain-text file is")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    p.add_argument("--no-byte-fallback", action="store_true", help="map unknown characters to <unk> instead of bytes")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="sample this many lines (seeded) from big corpora; 0 uses every line")
    p.add_argument("--num-threads", type=int, default=None, help="default: the CPU count (at most 16)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--verbose", action="store_true", help="sentencepiece's own training log")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        model = train_tokenizer(
            args.input, args.output_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
            json_key=args.json_keys, input_format=args.input_format, text_unit=args.text_unit,
            byte_fallback=not args.no_byte_fallback, character_coverage=args.character_coverage,
            input_sentence_size=args.input_sentence_size, num_threads=args.num_threads, seed=args.seed,
            show_progress=not args.quiet, verbose=args.verbose)
    except NeonError as err:
        print(f"train_tokenizer.py: error: {err}", file=sys.stderr)
        return err.exit_status
    if not args.quiet:
        print(NeonTokenizer(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
