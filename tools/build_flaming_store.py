#!/usr/bin/env python
r"""Build a FlamingMoE key-value store (neon/io/store.py) from a corpus, with its search index.

    python tools/build_flaming_store.py --input facts.jsonl --tokenizer-model tok.model \
        --output stores/facts --ngram 5 --key-dim 64 --value-width 1 [--index hnsw]
    python tools/build_flaming_store.py --input data/corpus_text_document --split 969,30,1 \
        --split-name train --output stores/train --index ivf_flat     # a .bin/.idx prefix: one split

Tokens mode (default): every position i of every document gives one entry,
key = encoder(ids[i-n+1 .. i]) and value = the next --value-width token ids. Vectors mode
(--values vectors): one entry per JSONL record, key = encoder(last n ids of its text),
value = the record's "value" list of --value-width floats. --passage-ids L records a fingerprint of
ids[i-L+1 .. i] per entry: an IO function with exclude=1 then skips the entries of a token's own
passage (a datastore of the text being trained on would hand each token its own next id).

Input: plain text (one document per line), JSONL with "text" (tokenized with --tokenizer-model) or
"ids" (token ids), or a megatron .bin/.idx prefix (tools/preprocess_data.py's output; with
--split and --split-name only the documents megatron gives that split, so a datastore built
from the training split holds no validation document). The encoder is --encoder random:<seed>
(a seeded frozen table) or path:<file.npy> ([vocab, key_dim], e.g. a model's input embeddings);
its description is recorded in meta.json, and the model builds its `context` queries with it.

--index: exact (every key scored, no index file), ivf_flat, ivf_pq or hnsw (faiss, neon/io/index.py);
its build parameters and default search parameters (--nprobe, --ef-search; an entry's nprobe= /
ef_search= changes them at run time) are recorded in meta.json. The store is written to --output;
meta.json is written last, so an interrupted build leaves no openable store.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from neon.errors import DataError, NeonError  # noqa: E402

INDEX_TYPES = ("exact", "ivf_flat", "ivf_pq", "hnsw")
SPLIT_NAMES = ("train", "valid", "test")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="text (one document per line), .jsonl, or a .bin/.idx prefix")
    p.add_argument("--output", required=True, help="store directory to write")
    p.add_argument("--tokenizer-model", help="sentencepiece .model (for text input)")
    p.add_argument("--vocab-size", type=int, help="vocabulary size (default: the tokenizer's)")
    p.add_argument("--split", help="with a .bin/.idx prefix: Megatron-LM's train,valid,test proportions")
    p.add_argument("--split-name", choices=SPLIT_NAMES, help="with --split: the one split to read")
    p.add_argument("--encoder", default="random:1234", help="random:<seed> or path:<file.npy>")
    p.add_argument("--ngram", type=int, default=4, help="n: ids per key (the token and n-1 before it)")
    p.add_argument("--key-dim", type=int, default=64, help="K (random encoder; a path gives its own)")
    p.add_argument("--values", choices=["tokens", "vectors"], default="tokens")
    p.add_argument("--value-width", type=int, default=1, help="continuation tokens (or vector size) per entry")
    p.add_argument("--stride", type=int, default=1, help="keep every stride-th position (tokens mode)")
    p.add_argument("--passage-ids", type=int, default=0,
                   help="L: also record a fingerprint of the L ids up to each entry, so that an IO function "
                        "with exclude=1 skips a token's own passage (tokens mode; 0: none)")
    g = p.add_argument_group("index (neon/io/index.py)")
    g.add_argument("--index", choices=INDEX_TYPES, default="exact", help="the search index of the keys")
    g.add_argument("--nlist", type=int, default=0, help="IVF cells (default: 4 sqrt(entries))")
    g.add_argument("--nprobe", type=int, default=16, help="IVF cells scanned per query (default search parameter)")
    g.add_argument("--pq-m", type=int, default=0, help="IVF-PQ codes per key (default: key_dim / 4)")
    g.add_argument("--pq-nbits", type=int, default=8, help="IVF-PQ bits per code")
    g.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per key")
    g.add_argument("--ef-construction", type=int, default=64, help="HNSW candidates while building")
    g.add_argument("--ef-search", type=int, default=64, help="HNSW candidates per query (default search parameter)")
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
                raise DataError(f"{path}:{lineno}: a record needs 'ids', or 'text' with --tokenizer-model")
            if values == "vectors":
                if "value" not in rec:
                    raise DataError(f"{path}:{lineno}: --values vectors needs a 'value' list per record")
                yield ids, rec["value"]
            else:
                yield ids


def indexed_documents(prefix: str, split: str | None, split_name: str | None):
    """The documents of a megatron .bin/.idx prefix (those of one split with --split and
    --split-name, cut exactly as megatron's dataset builder cuts them) as token-id lists."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from neon.data.datasets import _split_ranges, parse_split

    data = IndexedDataset(prefix, mmap=True)
    n = len(data)
    begin, end = 0, n
    if split_name is not None:
        ranges = _split_ranges(parse_split(split), n)
        rng = ranges[SPLIT_NAMES.index(split_name)]
        if rng is None or rng[1] <= rng[0]:
            raise DataError(f"--split {split} gives the {split_name} split of {prefix} no document. Fix: give it a "
                            "share of --split.")
        begin, end = rng
    return [data[i].tolist() for i in range(begin, end)]


def encoder_description(args, vocab: int) -> dict:
    from neon.io.encoder import describe

    key_dim = args.key_dim
    if args.encoder.startswith("path:"):
        table = args.encoder[5:]
        if not os.path.isfile(table):
            raise DataError(f"--encoder {args.encoder}: no such file")
        shape = np.load(table, mmap_mode="r").shape
        if len(shape) != 2 or shape[0] != vocab:
            raise DataError(f"--encoder {args.encoder}: table shape {shape}, expected [{vocab}, key_dim]")
        key_dim = shape[1]
    elif not args.encoder.startswith("random:"):
        raise DataError(f"--encoder {args.encoder!r}: use random:<seed> or path:<file.npy>")
    return describe(args.encoder, args.ngram, key_dim, vocab)


def build(args) -> dict:
    """Checks every input first (cheap), then writes the keys and values, then the index."""
    prefix = args.input[:-4] if args.input.endswith((".bin", ".idx")) else args.input
    indexed = os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")
    if not indexed and not os.path.isfile(args.input):
        raise DataError(f"--input {args.input}: no such file (nor a .bin/.idx prefix)")
    if (args.split is None) != (args.split_name is None) or (args.split and not indexed):
        raise DataError("--split and --split-name go together, with a .bin/.idx prefix as --input")
    if os.path.exists(os.path.join(args.output, "meta.json")):
        raise DataError(f"--output {args.output} already holds a store; remove it or choose another directory")
    tokenizer = None
    if args.tokenizer_model:
        import sentencepiece as spm

        tokenizer = spm.SentencePieceProcessor(model_file=args.tokenizer_model)
    vocab = args.vocab_size or (tokenizer.vocab_size() if tokenizer else None)
    if not vocab:
        raise DataError("give --vocab-size (or --tokenizer-model)")
    for name in ("ngram", "key_dim", "value_width", "stride"):
        if getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be >= 1")
    if args.passage_ids < 0 or (args.passage_ids and args.values != "tokens"):
        raise DataError(f"--passage-ids {args.passage_ids}: give L >= 1 with token values (or 0 for none)")
    if not args.encoder.startswith(("random:", "path:")):
        raise DataError(f"--encoder {args.encoder!r}: use random:<seed> or path:<file.npy>")
    if indexed:
        if args.values != "tokens":
            raise DataError("a .bin/.idx prefix gives token values: drop --values vectors")
        records = indexed_documents(prefix, args.split, args.split_name)
    else:
        records = list(read_records(args.input, tokenizer, args.values))
    for rec in records:
        ids = rec[0] if args.values == "vectors" else rec
        if args.values == "vectors" and len(rec[1]) != args.value_width:
            raise DataError(f"a record's 'value' has {len(rec[1])} entries, --value-width is {args.value_width}")
        if any(i < 0 or i >= vocab for i in ids):
            raise DataError(f"token ids must lie in [0, {vocab}); found {min(ids)}..{max(ids)}")
    desc = encoder_description(args, vocab)
    stride = args.stride if args.values == "tokens" else 1
    entries = (sum(len(range(0, len(r) - 1, stride)) for r in records) if args.values == "tokens"
               else len(records))
    from neon.io.index import index_params
    from neon.io.store import write_store

    params = index_params(args.index, entries, desc["key_dim"], nlist=args.nlist, nprobe=args.nprobe, pq_m=args.pq_m,
                          pq_nbits=args.pq_nbits, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                          ef_search=args.ef_search)
    bar = tqdm(total=len(records), unit="doc", disable=args.quiet, desc="store")
    bars: dict = {}

    def index_progress(stage: str, done: int, total: int):
        if args.quiet:
            return
        if stage not in bars:
            bars[stage] = tqdm(total=total, unit="key", desc=f"index {stage}")
        bars[stage].update(done - bars[stage].n)

    meta = write_store(args.output, desc, records, values=args.values, value_width=args.value_width,
                       stride=stride, progress=bar.update, index=params, index_progress=index_progress,
                       passage_ids=args.passage_ids)
    bar.close()
    for b in bars.values():
        b.close()
    return meta


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        meta = build(args)
    except NeonError as e:
        print(f"build_flaming_store.py: error: {e}", file=sys.stderr)
        return e.exit_status
    if not args.quiet:
        index = meta.get("index", {"type": "exact"})
        print(f"{args.output}: {meta['entries']} entries, key_dim {meta['key_dim']}, index {index['type']}, "
              f"sha256 {meta['content_sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
