"""Shared fixtures of the data-pipeline tests: a real sentencepiece model trained on real text
(pydoc's topics, which every Python has) and small JSONL corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_VOCAB = 512


def sample_documents(n: int = 40) -> list[str]:
    """n real documents: paragraphs of pydoc topics plus a few with unicode, tabs and indentation."""
    from pydoc_data import topics

    paras = [p.strip("\n") for name in sorted(topics.topics) for p in topics.topics[name].split("\n\n")
             if len(p.strip()) > 40]
    special = ["Grüße aus Köln — naïve café ½ “quotes” 漢字 🎉",
               "def f(x):\n\tif x:\n        return  x  # two  spaces\n\n\nend",
               "trailing spaces   \nand a final newline\n"]
    docs = special + paras
    return docs[:n]


def write_jsonl(path: Path, docs: list[str], key: str = "text", **extra) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({key: d, "id": i, **extra}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A BPE model (vocab 512, byte fallback) trained on pydoc topics text."""
    from neon.data.tokenizer_training import train_tokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    corpus = write_jsonl(d / "train.jsonl", sample_documents(400))
    return train_tokenizer([str(corpus)], d / "tiny", vocab_size=TINY_VOCAB, show_progress=False)


HF_EOS, HF_BOS = "<|endoftext|>", "<|begin_of_text|>"


def write_hf_tokenizer(directory: Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE `tokenizer.json` trained with the `tokenizers` library on pydoc topics, laid
    out as Llama 3's: a post-processor that adds bos, eos named in tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[HF_BOS, HF_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample_documents(400), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{HF_BOS} $A", special_tokens=[(HF_BOS, 0)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": HF_BOS, "eos_token": HF_EOS}))
    return directory


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory) -> Path:
    """The directory of a Hugging Face tokenizer.json (write_hf_tokenizer)."""
    return write_hf_tokenizer(tmp_path_factory.mktemp("hf_tokenizer"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_tokenizer) -> tuple[str, list[str]]:
    """(prefix, documents): 120 documents preprocessed with EOD tokens."""
    from neon.data.preprocess import preprocess

    d = tmp_path_factory.mktemp("dataset")
    docs = sample_documents(120)
    corpus = write_jsonl(d / "docs.jsonl", docs)
    result = preprocess([str(corpus)], d / "tiny", tiny_tokenizer, workers=1, append_eod=True, show_progress=False)
    return result.prefixes["text"], docs


def load_tool(name: str):
    """tools/<name>.py as a module (tools/ is not a package), to call its main(argv) in-process."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"neon_tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
