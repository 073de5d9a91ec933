#!/usr/bin/env python
r"""Build a FlamingMoE key-value store (neon/flaming/store.py) from a corpus.

    python tools/build_flaming_store.py --input facts.jsonl --tokenizer-model tok.model \
        --output stores/facts --ngram 5 --key-dim 64 --value-width 1

Tokens mode (default): every position i of every document gives one entry,
key = encoder(ids[i-n+1 .. i]) and value = the next --value-width token ids. Vectors mode
(--values vectors): one entry per JSONL record, key = encoder(last n ids of its text),
value = the record's "value" list of --value-width floats.

Input: plain text (one document per line) or JSONL with "text" (tokenized with
--tokenizer-model) or "ids" (token ids, no tokenizer needed). The encoder is
--encoder random:<seed> (a seeded frozen table) or path:<file.npy> ([vocab, key_dim], e.g. a
model's input embeddings); its description is recorded in meta.json, and the model builds its
`context` queries with the same encoder. The store is written to --output; meta.json is written
last, so an interrupted build leaves no openable store.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402


class BuildError(ValueError):
    pass


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="text (one document per line) or .jsonl file")
    p.add_argument("--output", required=True, help="store directory to write")
    p.add_argument("--tokenizer-model", help="sentencepiece .model (for text input)")
    p.add_argument("--vocab-size", type=int, help="vocabulary size (default: the tokenizer's)")
    p.add_argument("--encoder", default="random:1234", help="random:<seed> or path:<file.npy>")
    p.add_argument("--ngram", type=int, default=4, help="n: ids per key (the token and n-1 before it)")
    p.add_argument("--key-dim", type=int, default=64, help="K (random encoder; a path gives its own)")
    p.add_argument("--values", choices=["tokens", "vectors"], default="tokens")
    p.add_argument("--value-width", type=int, default=1, help="continuation tokens (or vector size) per entry")
    p.add_argument("--stride", type=int, default=1, help="keep every stride-th position (tokens mode)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def read_records(path: str, tokenizer, values: str):
    """Yields token-id lists (tokens) or (ids, vector) pairs (vectors)."""
    jsonl = path.endswith((".jsonl", ".json", ".ndjson"))
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line) if jsonl else {"text": line.rstrip("\n")}
            if "ids" in rec:
                ids = [int(i) for i in rec["ids"]]
            elif "text" in rec and tokenizer is not None:
                ids = tokenizer.encode(rec["text"])
            else:
                raise BuildError(f"{path}:{lineno}: a record needs 'ids', or 'text' with --tokenizer-model")
            if values == "vectors":
                if "value" not in rec:
                    raise BuildError(f"{path}:{lineno}: --values vectors needs a 'value' list per record")
                yield ids, rec["value"]
            else:
                yield ids


def encoder_description(args, vocab: int) -> dict:
    from neon.flaming.encoder import describe

    key_dim = args.key_dim
    if args.encoder.startswith("path:"):
        table = args.encoder[5:]
        if not os.path.isfile(table):
            raise BuildError(f"--encoder {args.encoder}: no such file")
        shape = np.load(table, mmap_mode="r").shape
        if len(shape) != 2 or shape[0] != vocab:
            raise BuildError(f"--encoder {args.encoder}: table shape {shape}, expected [{vocab}, key_dim]")
        key_dim = shape[1]
    elif not args.encoder.startswith("random:"):
        raise BuildError(f"--encoder {args.encoder!r}: use random:<seed> or path:<file.npy>")
    return describe(args.encoder, args.ngram, key_dim, vocab)


def build(args) -> dict:
    """Checks every input first (cheap, before megatron-core is imported), then writes."""
    if not os.path.isfile(args.input):
        raise BuildError(f"--input {args.input}: no such file")
    if os.path.exists(os.path.join(args.output, "meta.json")):
        raise BuildError(f"--output {args.output} already holds a store; remove it or choose another directory")
    tokenizer = None
    if args.tokenizer_model:
        import sentencepiece as spm

        tokenizer = spm.SentencePieceProcessor(model_file=args.tokenizer_model)
    vocab = args.vocab_size or (tokenizer.vocab_size() if tokenizer else None)
    if not vocab:
        raise BuildError("give --vocab-size (or --tokenizer-model)")
    for name in ("ngram", "key_dim", "value_width", "stride"):
        if getattr(args, name) < 1:
            raise BuildError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.encoder.startswith(("random:", "path:")):
        raise BuildError(f"--encoder {args.encoder!r}: use random:<seed> or path:<file.npy>")
    records = list(read_records(args.input, tokenizer, args.values))
    for rec in records:
        ids = rec[0] if args.values == "vectors" else rec
        if args.values == "vectors" and len(rec[1]) != args.value_width:
            raise BuildError(f"a record's 'value' has {len(rec[1])} entries, --value-width is {args.value_width}")
        if any(i < 0 or i >= vocab for i in ids):
            raise BuildError(f"token ids must lie in [0, {vocab}); found {min(ids)}..{max(ids)}")
    desc = encoder_description(args, vocab)
    from neon.flaming.store_build import write_store

    bar = tqdm(total=len(records), unit="doc", disable=args.quiet, desc="store")
    meta = write_store(args.output, desc, records, values=args.values, value_width=args.value_width,
                       stride=args.stride, progress=bar.update)
    bar.close()
    return meta


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        meta = build(args)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"{args.output}: {meta['entries']} entries, key_dim {meta['key_dim']}, "
              f"sha256 {meta['content_sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
