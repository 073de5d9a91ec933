"""tools/train_tokenizer.py: a real sentencepiece BPE model with byte fallback, the special ids the
model needs, and exact round trips of any text."""

import subprocess
import sys
from pathlib import Path

import pytest

from neon.data import DataError, NeonTokenizer
from neon.data.tokenizer_training import train_tokenizer
from tests.data_helpers import TINY_VOCAB, sample_documents, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def test_cli_trains_from_jsonl_key_with_special_ids_and_exact_round_trip(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_documents(300), key="content")
    out = subprocess.run([sys.executable, str(ROOT / "tools/train_tokenizer.py"), "--input", str(corpus),
                          "--json-keys", "content", "--output-prefix", str(tmp_path / "tok"),
                          "--vocab-size", "600"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "reading lines for the tokenizer" in out.stderr  # progress shown
    tok = NeonTokenizer(tmp_path / "tok.model")
    assert tok.vocab_size == 600
    assert (tok.unk, tok.bos, tok.eod, tok.pad) == (0, 1, 2, 3)
    assert tok.eod == tok.eos
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (tok.id_to_piece(4), tok.id_to_piece(259)) == ("<0x00>", "<0xFF>")  # the 256 byte-fallback pieces

    for text in sample_documents(3) + ["  leading spaces\n\n\ttab\r\nwindows", "unseen: ∮ 𝔘 ☃ \x00"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.unk not in ids  # byte fallback, never <unk>
        assert tok.decode(ids) == text
    # BPE learned something: common English compresses well below one token per byte
    text = sample_documents(40)[-1]
    assert len(tok.encode(text)) < 0.6 * len(text.encode())


def test_plain_text_input_and_determinism(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sample_documents(200)), encoding="utf-8")
    a = train_tokenizer([str(corpus)], tmp_path / "a", vocab_size=TINY_VOCAB, show_progress=False)
    b = train_tokenizer([str(corpus)], tmp_path / "b", vocab_size=TINY_VOCAB, show_progress=False)
    ta, tb = NeonTokenizer(a), NeonTokenizer(b)
    assert [ta.id_to_piece(i) for i in range(TINY_VOCAB)] == [tb.id_to_piece(i) for i in range(TINY_VOCAB)]


def test_bad_vocab_size_and_inputs_name_the_fix(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_documents(20))
    with pytest.raises(DataError, match="--vocab-size 100 is too small"):
        train_tokenizer([str(corpus)], tmp_path / "t", vocab_size=100, show_progress=False)
    with pytest.raises(DataError, match="lower --vocab-size"):
        train_tokenizer([str(corpus)], tmp_path / "t", vocab_size=50000, show_progress=False)
    with pytest.raises(DataError, match="no key 'body'.*--json-keys"):
        train_tokenizer([str(corpus)], tmp_path / "t", vocab_size=400, json_key="body", show_progress=False)
    with pytest.raises(DataError, match="does not exist"):
        train_tokenizer([str(tmp_path / "nope.jsonl")], tmp_path / "t", vocab_size=400, show_progress=False)
    with pytest.raises(DataError, match="train one with tools/train_tokenizer.py"):
        NeonTokenizer(tmp_path / "missing.model")
