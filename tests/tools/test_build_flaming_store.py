"""tools/build_flaming_store.py: JSONL of ids, text through the sentencepiece tokenizer, and
vector values give openable stores whose entries are the documents' n-grams and continuations;
bad input fails with a one-line error and writes no store."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from neon.io.encoder import NgramEncoder
from neon.io.store import open_store

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, timeout=180):
    return subprocess.run([sys.executable, str(ROOT / "tools/build_flaming_store.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_jsonl_ids_and_text_with_tokenizer(tmp_path, tiny_tokenizer):
    src = tmp_path / "ids.jsonl"
    src.write_text("\n".join(json.dumps({"ids": d}) for d in ([5, 6, 7, 8], [9, 10])) + "\n")
    r = run_cli("--input", src, "--output", tmp_path / "a", "--vocab-size", 16, "--ngram", 2,
                "--key-dim", 6, "--value-width", 2)
    assert r.returncode == 0, r.stderr
    store = open_store(str(tmp_path / "a"), verify=True)
    assert store.values.tolist() == [[6, 7], [7, 8], [8, -1], [10, -1]]
    enc = NgramEncoder(store.meta["encoder"])
    assert np.allclose(store.keys[1], enc(torch.tensor([[5, 6]]))[0].numpy())
    assert store.meta["encoder"]["table"] == "random:1234"

    text = tmp_path / "facts.txt"
    text.write_text("the code of alice is 42\nthe code of bob is 7\n")
    r = run_cli("--input", text, "--output", tmp_path / "b", "--tokenizer-model", tiny_tokenizer, "--ngram", 3)
    assert r.returncode == 0, r.stderr
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    ids = [sp.encode(line) for line in text.read_text().splitlines()]
    store = open_store(str(tmp_path / "b"))
    assert store.values[:, 0].tolist() == [t for d in ids for t in d[1:]]


def test_vector_values(tmp_path):
    src = tmp_path / "v.jsonl"
    src.write_text(json.dumps({"ids": [1, 2, 3], "value": [0.5, -1.0]}) + "\n")
    r = run_cli("--input", src, "--output", tmp_path / "v", "--vocab-size", 8, "--values", "vectors",
                "--value-width", 2, "--ngram", 2, "--key-dim", 4)
    assert r.returncode == 0, r.stderr
    store = open_store(str(tmp_path / "v"))
    assert store.values.tolist() == [[0.5, -1.0]] and store.entries == 1


def test_bad_input_fails_clearly_and_writes_no_store(tmp_path):
    src = tmp_path / "ids.jsonl"
    src.write_text(json.dumps({"ids": [1, 99]}) + "\n")
    cases = [(["--input", tmp_path / "nope.txt", "--vocab-size", 8], "no such file"),
             (["--input", src, "--vocab-size", 8], "token ids must lie in [0, 8)"),
             (["--input", src, "--vocab-size", 128, "--encoder", "lsh:3"], "random:<seed>"),
             (["--input", src], "--vocab-size")]
    for args, words in cases:
        r = run_cli(*args, "--output", tmp_path / "out")
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not (tmp_path / "out" / "meta.json").exists()


def test_index_and_one_split_of_a_megatron_prefix(tmp_path):
    """A .bin/.idx prefix with --split/--split-name gives the entries of exactly that split's
    documents (no validation document in a training datastore), with a faiss index recorded in
    meta.json and built with a progress bar."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from neon.data.datasets import _split_ranges, parse_split

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(30, 60, (40,), generator=gen)
    docs = [torch.randint(2, 60, (int(n),), generator=gen).tolist() for n in lengths]
    prefix = tmp_path / "corpus_text_document"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for d in docs:
        builder.add_document(torch.tensor(d), [len(d)])
    builder.finalize(f"{prefix}.idx")
    r = run_cli("--input", prefix, "--split", "80,20,0", "--split-name", "train", "--vocab-size", 64, "--ngram", 2,
                "--key-dim", 8, "--index", "ivf_flat", "--output", tmp_path / "train")
    assert r.returncode == 0, r.stderr
    assert "index add" in r.stderr and "ivf_flat" in r.stdout  # progress bars and the summary
    store = open_store(str(tmp_path / "train"), verify=True)
    begin, end = _split_ranges(parse_split("80,20,0"), len(docs))[0]
    train = docs[begin:end]
    assert store.values[:, 0].tolist() == [t for d in train for t in d[1:]]  # exactly the training documents
    valid = {tuple(d) for d in docs[end:]}
    assert valid and not valid & {tuple(d) for d in train}
    assert store.meta["index"]["type"] == "ivf_flat" and store.meta["index"]["nlist"] >= 1
    r = run_cli("--input", prefix, "--split", "80,20,0", "--vocab-size", 64, "--output", tmp_path / "bad")
    assert r.returncode == 2 and "--split-name" in r.stderr and "Traceback" not in r.stderr
