"""Writes tests/data/golden_all_features/: a tiny checkpoint with every Neon feature on, made by the
code of the commit that added it, with the losses that code recorded for the next 5 iterations.

    python tests/data/make_golden_checkpoint.py

The tokenizer and the .bin/.idx are committed beside it, so the test does not depend on how this
machine's Python sources (the corpus) or sentencepiece build differ from the one that made it.
Rerun only on purpose: the checkpoint pins today's format and numerics.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.neon.training.corpus import make_corpus  # noqa: E402
from tests.neon.training.runs import check, launch, metrics, tiny_args  # noqa: E402

OUT = REPO / "tests" / "data" / "golden_all_features"
FIRST, EXTRA = 40, 5
FEATURES = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                diff_attention="matched", ngpt=True, flaming_moe="between", flaming_global_functions=4,
                flaming_layer_functions=2, flaming_router="topk", flaming_topk=1, sliding_window=16,
                lr=1e-2, min_lr=1e-3)


def _small_corpus(work: Path, docs: int = 400) -> tuple[str, str]:
    """The training tests' corpus, cut to its first `docs` documents (enough for the 9 steps)."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, data = make_corpus(Path(tmp))
        work.mkdir(parents=True)
        shutil.copy(tokenizer, work / "tok.model")
        full = IndexedDataset(data)
        builder = IndexedDatasetBuilder(str(work / "corpus_text_document.bin"), dtype=np.uint16)
        for i in range(docs):
            tokens = full[i]
            builder.add_document(torch.from_numpy(tokens.astype(np.int64)), [len(tokens)])
        builder.finalize(str(work / "corpus_text_document.idx"))
    return str(work / "tok.model"), str(work / "corpus_text_document")


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    tokenizer, data = _small_corpus(OUT / "corpus")
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full"
        args = tiny_args(tokenizer, data, **FEATURES, train_iters=FIRST + EXTRA, save=full, save_interval=FIRST,
                         ckpt_keep_last=0, eval_iters=0, lr_warmup_iters=0)
        check(launch(args, nproc=1, timeout=300))
        shutil.copytree(full / f"iter_{FIRST:07d}", OUT / "checkpoint" / f"iter_{FIRST:07d}")
        (OUT / "checkpoint" / "latest_checkpointed_iteration.txt").write_text(str(FIRST))
        shutil.copy(full / "config.yaml", OUT / "config.yaml")
        recorded = {it: {"loss": r["loss"], "grad_norm": r["grad_norm"], "lr": r["lr"]}
                    for it, r in metrics(full).items() if it > FIRST}
    (OUT / "expected.json").write_text(json.dumps(
        {"first_iteration": FIRST, "train_iters": FIRST + EXTRA, "flags": FEATURES, "next_losses": recorded},
        indent=1))
    shutil.rmtree(OUT / "corpus" / "corpus_text_document", ignore_errors=True)  # megatron's index cache
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
