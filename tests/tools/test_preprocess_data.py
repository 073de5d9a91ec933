"""tools/preprocess_data.py: text/JSONL -> megatron-core .bin/.idx with worker processes; the
documents come back exactly; files written the Megatron-LM way (megatron-core's
IndexedDatasetBuilder directly) load through Neon's dataset path."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from neon.data import DataError, NeonTokenizer, build_split_datasets, check_data_files
from neon.data.preprocess import preprocess
from tests.data_helpers import TINY_VOCAB, load_tool, sample_documents, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, timeout=180):
    return subprocess.run([sys.executable, str(ROOT / "tools/preprocess_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_two_workers_equal_one_and_documents_come_back_exactly(tmp_path, tiny_tokenizer):
    docs = sample_documents(150)
    docs.insert(7, "   ")  # tokenizes to whitespace only: kept (it is text); a blank JSON text is skipped
    docs.insert(9, "")
    corpus = write_jsonl(tmp_path / "in.jsonl", docs, key="body")
    outs = {workers: tmp_path / f"w{workers}_body_document" for workers in (1, 2)}
    # 2 workers through the real command line, 1 worker through the same main() in-process
    r = run_cli("--input", corpus, "--json-keys", "body", "--tokenizer-model", tiny_tokenizer,
                "--output-prefix", tmp_path / "w2", "--workers", 2, "--append-eod", "--chunk-size", 4)
    assert r.returncode == 0, r.stderr
    assert "preprocessing" in r.stderr and "docs/s" in r.stdout  # tqdm bar and the summary
    assert load_tool("preprocess_data").main(
        ["--input", str(corpus), "--json-keys", "body", "--tokenizer-model", str(tiny_tokenizer),
         "--output-prefix", str(tmp_path / "w1"), "--workers", "1", "--append-eod", "--quiet"]) == 0
    for ext in (".bin", ".idx"):
        assert Path(str(outs[1]) + ext).read_bytes() == Path(str(outs[2]) + ext).read_bytes()

    tok = NeonTokenizer(tiny_tokenizer)
    kept = [d for d in docs if d]
    ds = IndexedDataset(str(outs[2]))
    assert len(ds) == len(kept) and ds.document_indices.tolist() == list(range(len(kept) + 1))
    assert ds.index.dtype == np.uint16
    for i, doc in enumerate(kept):
        ids = ds[i].tolist()
        assert ids == tok.encode(doc) + [tok.eod]
        assert tok.decode(ids[:-1]) == doc


def test_text_input_units_and_several_json_keys(tmp_path, tiny_tokenizer):
    tok = NeonTokenizer(tiny_tokenizer)
    txt = tmp_path / "in.txt"
    txt.write_text("first para\nline two\n\nsecond para\n\n\nthird\n", encoding="utf-8")
    for unit, expect in (("line", ["first para", "line two", "second para", "third"]),
                         ("paragraph", ["first para\nline two", "second para", "third"]),
                         ("file", ["first para\nline two\n\nsecond para\n\n\nthird\n"])):
        res = preprocess([str(txt)], tmp_path / unit, tiny_tokenizer, text_unit=unit, append_eod=False,
                         show_progress=False)
        ds = IndexedDataset(res.prefixes["text"])
        assert [tok.decode(ds[i]) for i in range(len(ds))] == expect

    corpus = write_jsonl(tmp_path / "two.jsonl", ["question one", "question two"], key="q", a="an answer")
    res = preprocess([str(corpus)], tmp_path / "qa", tiny_tokenizer, json_keys=["q", "a"], workers=2,
                     show_progress=False)
    assert set(res.prefixes) == {"q", "a"} and res.prefixes["a"].endswith("qa_a_document")
    q, a = IndexedDataset(res.prefixes["q"]), IndexedDataset(res.prefixes["a"])  # arrays die with their dataset
    assert tok.decode(q[1][:-1]) == "question two"
    assert tok.decode(a[0][:-1]) == "an answer"


def test_bad_inputs_fail_clearly_and_leave_no_output(tmp_path, tiny_tokenizer, capsys):
    corpus = write_jsonl(tmp_path / "in.jsonl", sample_documents(5))
    rc = load_tool("preprocess_data").main(["--input", str(corpus), "--json-keys", "content", "--tokenizer-model",
                                            str(tiny_tokenizer), "--output-prefix", str(tmp_path / "bad"),
                                            "--workers", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "in.jsonl:1: no key 'content'" in err and "--json-keys" in err
    assert not list(tmp_path.glob("bad*"))
    with pytest.raises(DataError, match="train one with tools/train_tokenizer.py"):
        preprocess([str(corpus)], tmp_path / "x", tmp_path / "nope.model", show_progress=False)
    with pytest.raises(DataError, match="matches no file"):
        preprocess([str(tmp_path / "*.parquet")], tmp_path / "x", tiny_tokenizer, show_progress=False)


def test_megatron_lm_written_files_load(tmp_path, tiny_tokenizer):
    """Megatron-LM's preprocess_data.py is megatron-core's IndexedDatasetBuilder + add_document;
    with --split-sentences a document holds several sequences, and int32 tokens for big vocabularies."""
    tok = NeonTokenizer(tiny_tokenizer)
    docs = sample_documents(60)
    prefix = str(tmp_path / "megatron_text_sentence")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in docs:
        sentences = [s for s in doc.split(". ") if s]
        ids = [tok.encode(s) for s in sentences]
        ids[-1] = ids[-1] + [tok.eod]
        builder.add_document(torch.tensor([t for s in ids for t in s]), [len(s) for s in ids])
    builder.finalize(prefix + ".idx")

    (info,) = check_data_files([prefix], tok.vocab_size)
    assert info.num_documents == len(docs) and info.num_sequences > len(docs) and info.dtype == np.int32
    train, valid, test = build_split_datasets([prefix], "8,2,0", seq_length=16, num_samples=(20, 4, 0), seed=3,
                                        vocab_size=tok.vocab_size, eod_id=tok.eod, cache_dir=str(tmp_path / "cache"))
    assert test is None and len(train) >= 20 and len(valid) >= 4
    indexed = IndexedDataset(prefix)
    stream = np.concatenate([indexed[i] for i in range(info.num_sequences)])
    s = train[0]["tokens"].numpy()
    windows = np.lib.stride_tricks.sliding_window_view(stream, len(s))
    assert (windows == s).all(axis=1).any()  # a sample is a window of the real token stream
    assert max(int(train[i]["tokens"].max()) for i in range(len(train))) < TINY_VOCAB


def test_hugging_face_tokenizer_through_the_cli(tmp_path, hf_tokenizer, tiny_tokenizer):
    """Megatron-LM's `--tokenizer-type HuggingFaceTokenizer --tokenizer-model <dir>`: each document's
    ids are the `tokenizers` library's own (no bos added) followed by eos; a type that does not fit
    the path is refused with exit 2, no traceback and no output."""
    from tokenizers import Tokenizer

    docs = sample_documents(30)
    corpus = write_jsonl(tmp_path / "in.jsonl", docs)
    res = run_cli("--input", corpus, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer,
                  "--output-prefix", tmp_path / "hf", "--workers", "2", "--append-eod", "--quiet")
    assert res.returncode == 0, res.stderr
    reference = Tokenizer.from_file(str(hf_tokenizer / "tokenizer.json"))
    eos = reference.token_to_id("<|endoftext|>")
    indexed = IndexedDataset(str(tmp_path / "hf_text_document"))
    assert len(indexed) == len(docs)
    for i, doc in enumerate(docs):
        assert indexed[i].tolist() == reference.encode(doc, add_special_tokens=False).ids + [eos]
    for kind, model in (("HuggingFaceTokenizer", tiny_tokenizer), ("GPTSentencePieceTokenizer", hf_tokenizer)):
        res = run_cli("--input", corpus, "--tokenizer-type", kind, "--tokenizer-model", model,
                      "--output-prefix", tmp_path / "bad", "--quiet")
        assert res.returncode == 2 and f"--tokenizer-type {kind} needs" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and not list(tmp_path.glob("bad*"))
