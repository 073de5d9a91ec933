"""A tiny tokenized corpus for the training tests: real sentencepiece, real megatron .bin/.idx."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import json as _json
import textwrap
from pathlib import Path

import numpy as np


def make_corpus(work_dir: Path, vocab_size: int = 256) -> tuple[str, str]:
    """(tokenizer model path, data prefix) built from a few standard-library sources."""
    import sentencepiece as spm
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    work_dir.mkdir(parents=True, exist_ok=True)
    docs = []
    for module in (argparse, dataclasses, _json, textwrap, inspect):
        text = inspect.getsource(module)
        docs += [chunk for chunk in text.split("\n\n") if len(chunk) > 40]
    text_file = work_dir / "corpus.txt"
    text_file.write_text("\n".join(d.replace("\n", " ") for d in docs))
    prefix = work_dir / "tok"
    spm.SentencePieceTrainer.train(input=str(text_file), model_prefix=str(prefix), vocab_size=vocab_size,
                                   model_type="bpe", bos_id=-1, eos_id=1, unk_id=0, pad_id=-1,
                                   num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    data_prefix = work_dir / "corpus_text_document"
    builder = IndexedDatasetBuilder(f"{data_prefix}.bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.tensor(sp.encode(doc) + [sp.eos_id()]), [len(sp.encode(doc)) + 1])
    builder.finalize(f"{data_prefix}.idx")
    (work_dir / "meta.json").write_text(json.dumps({"docs": len(docs)}))
    return f"{prefix}.model", str(data_prefix)
