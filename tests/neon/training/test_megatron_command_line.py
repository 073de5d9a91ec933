"""A Megatron-LM pretraining command line, moved over unchanged: separate train (a weighted blend),
valid and test data paths, document masks (--reset-position-ids --reset-attention-mask
--eod-mask-loss) and a Hugging Face tokenizer (--tokenizer-type HuggingFaceTokenizer), through
torchrun at DP=2. It trains (the test set's loss logged at the end; without
--reset-attention-mask the first step's loss differs), resumes exactly (an
uninterrupted run and one stopped at iteration 3 and resumed log the same losses, bit for bit),
and exports; the exported tokenizer gives the training ids. --mock-data trains without files
or tokenizer. Data-source flags that do not go together are refused with exit 2, no traceback."""

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from neon.data.preprocess import preprocess
from tests.data_helpers import sample_documents, write_hf_tokenizer, write_jsonl
from tests.neon.training.runs import REPO, as_flags, check, launch, metrics

pytestmark = pytest.mark.slow

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
             max_position_embeddings=64, seq_length=32, micro_batch_size=2, global_batch_size=8,
             lr=3e-3, min_lr=3e-4, lr_warmup_iters=1, eval_interval=3, eval_iters=1, log_interval=1,
             num_workers=1, seed=7)


@pytest.fixture(scope="module")
def megatron_data(tmp_path_factory):
    """A Hugging Face tokenizer directory and four preprocessed prefixes: train_a, train_b, valid, test."""
    d = tmp_path_factory.mktemp("megatron_data")
    tok = write_hf_tokenizer(d / "tokenizer")
    docs = [doc[:100] for doc in sample_documents(400)]  # short: every 32-token sample crosses documents
    parts = {"train_a": docs[:200], "train_b": docs[200:300], "valid": docs[300:350], "test": docs[350:]}
    prefixes = {}
    for name, part in parts.items():
        corpus = write_jsonl(d / f"{name}.jsonl", part)
        prefixes[name] = preprocess([str(corpus)], d / name, tok, show_progress=False,
                                    tokenizer_type="HuggingFaceTokenizer").prefixes["text"]
    return tok, prefixes, parts


def megatron_args(tok, prefixes, save, **overrides) -> list[str]:
    return ["--train-data-path", "0.7", prefixes["train_a"], "0.3", prefixes["train_b"],
            "--valid-data-path", prefixes["valid"], "--test-data-path", prefixes["test"],
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok),
            "--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss",
            "--save", str(save), "--load", str(save), *as_flags({**MODEL, "train_iters": 6, **overrides})]


def test_megatron_command_line_trains_resumes_exactly_and_exports(megatron_data, tmp_path):
    tok, prefixes, parts = megatron_data
    full = tmp_path / "full"
    check(launch(megatron_args(tok, prefixes, full), nproc=2, timeout=240))
    train, valid, test = metrics(full), metrics(full, "valid"), metrics(full, "test")
    assert sorted(train) == list(range(1, 7)) and sorted(valid) == [3, 6] and sorted(test) == [6]
    assert np.isfinite(test[6]["loss"]) and test[6]["loss"] != valid[6]["loss"]

    # The same first step with documents attending across EOD. One rank, the same global batch: the
    # order of the reduction moves the loss by ~1e-7 relative, far below the 1e-4 the mask must make.
    unmasked = tmp_path / "unmasked"
    args = [a for a in megatron_args(tok, prefixes, unmasked, exit_interval=1) if a != "--reset-attention-mask"]
    check(launch(args, nproc=1, timeout=240))
    assert abs(metrics(unmasked)[1]["loss"] - train[1]["loss"]) > 1e-4 * train[1]["loss"]

    resumed = tmp_path / "resumed"
    check(launch(megatron_args(tok, prefixes, resumed, exit_interval=3), nproc=2, timeout=240))
    assert sorted(metrics(resumed)) == [1, 2, 3]
    check(launch(megatron_args(tok, prefixes, resumed), nproc=2, timeout=240))
    again = metrics(resumed)
    assert [again[i]["loss"] for i in range(1, 7)] == [train[i]["loss"] for i in range(1, 7)]
    assert metrics(resumed, "test")[6]["loss"] == test[6]["loss"]

    hf = tmp_path / "hf"
    out = check(launch(["--load", str(full), "--save", str(hf)], nproc=0, timeout=240,
                       script=REPO / "tools" / "convert_to_hf.py"))
    assert "Traceback" not in out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoTokenizer.from_pretrained(str(hf))
    indexed = IndexedDataset(prefixes["valid"])
    for i, doc in enumerate(parts["valid"]):  # preprocessing wrote ids + eos
        assert exported(doc)["input_ids"] + [exported.eos_token_id] == indexed[i].tolist()
    AutoModelForCausalLM.from_pretrained(str(hf))  # every feature off: loads as Mistral


def test_mock_data_trains_without_files_or_tokenizer(tmp_path):
    out = check(launch(["--mock-data", "--vocab-size", "128", "--save", str(tmp_path / "run"),
                        *as_flags({**MODEL, "train_iters": 2, "num_workers": 0})], nproc=1, timeout=180))
    train = metrics(tmp_path / "run")
    assert sorted(train) == [1, 2] and all(np.isfinite(r["loss"]) for r in train.values()), out


@pytest.mark.parametrize("flags,message", [
    (["--valid-data-path", "x"], "--valid-data-path=['x']: needs --train-data-path"),
    (["--data-path", "a", "--train-data-path", "b", "--valid-data-path", "c"], "is given with --data-path"),
    (["--train-data-path", "b"], "--valid-data-path=[]: is not given while --eval-iters > 0"),
    (["--mock-data", "--data-path", "a"], "is given with --data-path"),
], ids=["valid-alone", "data-and-train", "train-without-valid", "mock-and-data"])
def test_data_sources_that_do_not_go_together_are_refused(flags, message, megatron_data, tmp_path):
    res = launch([*flags, "--tokenizer-model", str(megatron_data[0]), "--save", str(tmp_path / "run")],
                 nproc=0, timeout=60)
    text = check(res, 2)
    assert message in text and "Fix:" in text and "Traceback" not in text
    assert not (tmp_path / "run").exists()
