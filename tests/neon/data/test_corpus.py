"""The demo corpus comes from text every Python has, is deterministic and a few MB; one call
turns it into a tokenizer and a .bin/.idx the datasets load, and a second call redoes nothing."""

import json
import os

import pytest

from neon.data import NeonTokenizer, build_split_datasets, check_data_files
from neon.data.corpus import CORPUS_NAME, build_demo_corpus, prepare_demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    model, prefix = prepare_demo_data(work, vocab_size=1024, show_progress=False)
    return work, model, prefix


def test_demo_corpus_is_deterministic_real_text(demo, tmp_path):
    work, _, _ = demo
    again = build_demo_corpus(tmp_path, show_progress=False)
    assert again.read_bytes() == (work / CORPUS_NAME).read_bytes()
    assert 1_000_000 < again.stat().st_size < 10_000_000
    docs = [json.loads(line)["text"] for line in again.read_text(encoding="utf-8").splitlines()]
    assert len(docs) > 1000 and all(d.strip() for d in docs)
    assert any(d.startswith("The \"assert\" statement") for d in docs)  # pydoc_data.topics
    assert any(d.startswith("json.dumps\n\ndef dumps(obj") for d in docs)  # stdlib docstrings via ast


@pytest.mark.slow
def test_prepare_demo_data_once_then_skips(demo):
    work, model, prefix = demo
    tok = NeonTokenizer(model)
    assert tok.vocab_size == 1024 and prefix.endswith("demo_1024_text_document")
    (info,) = check_data_files([prefix], tok.vocab_size)
    assert info.num_documents > 1000 and info.num_tokens > 300_000
    stamps = {p: os.stat(p).st_mtime_ns for p in work.iterdir()}
    assert prepare_demo_data(work, vocab_size=1024, show_progress=False) == (model, prefix)
    assert {p: os.stat(p).st_mtime_ns for p in work.iterdir()} == stamps  # nothing redone
    train, valid, test = build_split_datasets([prefix], "949,50,1", 64, (32, 8, 8), 1234, tok.vocab_size, tok.eod,
                                        cache_dir=str(work / "cache"))
    assert tok.decode(train[0]["tokens"]).strip()
