#!/usr/bin/env python
r"""Tokenize text or JSONL into megatron-core indexed datasets (.bin/.idx), Megatron-LM style.

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \
        --tokenizer-model tokenizers/neon.model --output-prefix data/corpus --workers 8 --append-eod

writes data/corpus_text_document.bin/.idx; train with --data-path data/corpus_text_document.
The flags are Megatron-LM's tools/preprocess_data.py flags, and the files are the same format
(megatron-core's IndexedDatasetBuilder), so files from either tool load in either framework.
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed")  # megatron-core's import

from neon.data.documents import TEXT_UNITS  # noqa: E402
from neon.data.preprocess import preprocess  # noqa: E402
from neon.data.tokenizer import TOKENIZER_TYPES  # noqa: E402
from neon.errors import NeonError  # noqa: E402


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, help="text or JSONL files (globs allowed), in this order")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from each JSON line")
    g.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                   help="auto: .jsonl/.json/.ndjson files are JSONL, others plain text")
    g.add_argument("--text-unit", choices=TEXT_UNITS, default="line",
                   help="what one document of a plain-text file is")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-model", required=True, help="sentencepiece .model (tools/train_tokenizer.py), or a "
                   "directory holding a Hugging Face tokenizer.json")
    g.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES,
                   help="Megatron-LM's tokenizer type (default: what --tokenizer-model is)")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    g.add_argument("--chunk-size", type=int, default=32, help="documents handed to a worker at a time")
    g.add_argument("--log-interval", type=int, default=1000, help="accepted for Megatron-LM command lines "
                   "(progress is a tqdm bar)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        preprocess(args.input, args.output_prefix, args.tokenizer_model, json_keys=args.json_keys,
                   tokenizer_type=args.tokenizer_type,
                   workers=args.workers, append_eod=args.append_eod, input_format=args.input_format,
                   text_unit=args.text_unit, chunk_size=args.chunk_size, show_progress=not args.quiet)
    except NeonError as err:
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return err.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
