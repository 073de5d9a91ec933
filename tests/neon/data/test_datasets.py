"""build_split_datasets: megatron-core GPTDataset/BlendedDataset from Megatron-style --data-path and
--split, with packing, deterministic shuffling and blending weights honoured; check_data_files:
bad data files fail before anything is built, naming the file and the fix."""

import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from neon.data import DataError, build_split_datasets, check_data_files, parse_data_path
from neon.data.preprocess import preprocess
from tests.data_helpers import TINY_VOCAB, sample_documents, write_jsonl

SEQ = 24
EOD = 2


def build(prefixes, split="8,1,1", samples=(64, 8, 8), seed=1234, cache=None, **kw):
    return build_split_datasets(list(prefixes), split, SEQ, samples, seed, TINY_VOCAB, EOD, cache_dir=cache, **kw)


def copy_prefix(prefix: str, dst: Path) -> str:
    for ext in (".bin", ".idx"):
        dst.with_suffix(ext).write_bytes(Path(prefix + ext).read_bytes())
    return str(dst)


def test_samples_are_packed_windows_of_the_document_stream(tiny_dataset, tmp_path):
    prefix, docs = tiny_dataset
    train, valid, test = build([prefix], cache=str(tmp_path / "cache"))
    indexed = IndexedDataset(prefix)
    for ds in (train, valid, test):
        # the reference: the split's documents in the dataset's (shuffled) document order, concatenated;
        # unshuffled sample k is the window [k*SEQ, k*SEQ + SEQ + 1) of that stream
        stream = np.concatenate([indexed[int(d)] for d in ds.document_index])
        assert set(stream.tolist()) & {EOD}  # documents are separated by their EOD tokens
        for i in range(0, len(ds), 3):
            item = ds[i]
            assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
            k = int(ds.shuffle_index[i])
            window = stream[k * SEQ:k * SEQ + SEQ + 1]
            assert item["tokens"].tolist() == window[:-1].tolist()
            assert item["labels"].tolist() == window[1:].tolist()
            assert item["loss_mask"].tolist() == [1.0] * SEQ
            assert item["position_ids"].tolist() == list(range(SEQ))
    # train is shuffled: neighbouring samples are not neighbouring windows
    assert [int(train.shuffle_index[i]) for i in range(5)] != list(range(5))


def test_split_sizes_and_zero_sample_splits(tiny_dataset, tmp_path):
    prefix, docs = tiny_dataset
    n = len(docs)
    train, valid, test = build([prefix], split="6,2,2", samples=(10, 5, 5), cache=str(tmp_path / "c"))
    indexed = IndexedDataset(prefix)  # its arrays live only as long as it does
    for ds, (lo, hi) in ((train, (0, round(0.6 * n))), (valid, (round(0.6 * n), round(0.8 * n))),
                         (test, (round(0.8 * n), n))):
        assert sorted(set(ds.document_index.tolist())) == list(range(lo, hi))  # contiguous document ranges
        assert len(ds) == (int(indexed.sequence_lengths[lo:hi].sum()) - 1) // SEQ  # one epoch
    assert len(train) > len(valid) > 0

    # more samples than one epoch: further epochs, each document the same number of times
    big = build([prefix], split="6,2,2", samples=(3 * len(train), 0, 0), cache=str(tmp_path / "c"))[0]
    assert len(big) >= 3 * len(train)
    counts = Counter(big.document_index.tolist())
    assert set(counts.values()) == {3} or set(counts.values()) == {3, 4}

    # a split nobody asks samples of, or with no share of --split, is None
    train, valid, test = build([prefix], split="6,2,2", samples=(10, 0, 0), cache=str(tmp_path / "c"))
    assert train is not None and valid is None and test is None
    assert build([prefix], split="100,0,0", samples=(10, 5, 5), cache=str(tmp_path / "c"))[1:] == (None, None)
    # Megatron's habitual 949,50,1 leaves 120 documents no test document: a warning, no test set
    with pytest.warns(UserWarning, match="leaves the test split .* empty .* there is no test set"):
        train, valid, test = build([prefix], split="949,50,1", samples=(10, 5, 5), cache=str(tmp_path / "c"))
    assert len(valid) >= 5 and test is None


def test_same_seed_same_order_other_seed_other_order(tiny_dataset, tmp_path):
    prefix, _ = tiny_dataset

    def order(seed, cache):
        ds = build([prefix], seed=seed, cache=str(tmp_path / cache))[0]
        return [ds[i]["tokens"].tolist() for i in range(len(ds))]

    a = order(7, "a")
    assert a == order(7, "b")  # rebuilt from scratch in another cache dir
    assert a == order(7, "a")  # loaded from the cache
    b = order(8, "c")
    assert a != b and len(a) == len(b)
    # another seed packs the same documents in another order: the same tokens, up to the dropped tail
    ca, cb = Counter(t for s in a for t in s), Counter(t for s in b for t in s)
    assert sum(((ca - cb) + (cb - ca)).values()) <= 2 * SEQ


def test_blending_weights_are_honoured(tiny_dataset, tmp_path):
    prefix, _ = tiny_dataset
    a = copy_prefix(prefix, tmp_path / "a_text_document")
    b = copy_prefix(prefix, tmp_path / "b_text_document")
    for weights, n in (((0.25, 0.75), 400), ((3, 1), 200)):
        train, valid, _ = build([str(weights[0]), a, str(weights[1]), b], split="9,1,0", samples=(n, 40, 0),
                                cache=str(tmp_path / "cache"))
        assert len(train) == n
        share = Counter(int(train[i]["dataset_id"]) for i in range(len(train)))
        expect = weights[0] / sum(weights)
        assert abs(share[0] / n - expect) < 0.02, (share, weights)
        assert abs(Counter(int(valid[i]["dataset_id"]) for i in range(len(valid)))[0] / len(valid) - expect) < 0.05
    # DataLoader workers (spawn) receive the datasets pickled, the cache-folder variant included
    clone = pickle.loads(pickle.dumps(train))
    assert all((clone[i]["tokens"] == train[i]["tokens"]).all() for i in range(0, n, 9))
    # plain prefixes: blended in proportion to their sizes (equal here); the cache is optional
    train = build([a, b], split="9,1,0", samples=(100, 0, 0))[0]
    share = Counter(int(train[i]["dataset_id"]) for i in range(len(train)))
    assert abs(share[0] - share[1]) <= 2


def test_data_path_and_split_parsing():
    assert parse_data_path(["p1", "p2"]) == (["p1", "p2"], None)
    assert parse_data_path("0.3 p1 0.7 p2") == (["p1", "p2"], [0.3, 0.7])
    assert parse_data_path(["1", "p1"]) == (["p1"], [1.0])
    with pytest.raises(DataError, match="mixes weights and prefixes"):
        parse_data_path(["0.3", "p1", "p2"])
    with pytest.raises(DataError, match="--data-path is empty"):
        parse_data_path([])
    with pytest.raises(DataError, match="non-negative"):
        parse_data_path(["-1", "p1", "2", "p2"])
    with pytest.raises(DataError, match="--split '9;1' is not valid"):
        build(["whatever"], split="9;1")


def test_bad_data_files_fail_before_any_work_naming_file_and_fix(tiny_dataset, tmp_path):
    prefix, _ = tiny_dataset
    cache = tmp_path / "cache"

    missing = str(tmp_path / "nowhere_text_document")
    with pytest.raises(DataError, match=r"nowhere_text_document\.idx and .*\.bin not found.*preprocess_data\.py"):
        build([prefix, missing], cache=str(cache))

    truncated = copy_prefix(prefix, tmp_path / "cut_text_document")
    with open(truncated + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(truncated + ".bin") - 10)
    with pytest.raises(DataError, match=r"cut_text_document\.bin is truncated.*rerun tools/preprocess_data\.py"):
        build(["0.5", prefix, "0.5", truncated], cache=str(cache))

    mixed = copy_prefix(prefix, tmp_path / "mixed_text_document")
    with open(mixed + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match=r"mixed_text_document\.bin has .* bytes.*different runs"):
        check_data_files([mixed], TINY_VOCAB)

    garbage = copy_prefix(prefix, tmp_path / "garbage_text_document")
    Path(garbage + ".idx").write_bytes(b"not an index at all, just some bytes")
    with pytest.raises(DataError, match=r"garbage_text_document\.idx is not a megatron indexed-dataset index"):
        check_data_files([garbage], TINY_VOCAB)
    Path(garbage + ".idx").write_bytes(Path(prefix + ".idx").read_bytes()[:200])
    with pytest.raises(DataError, match=r"garbage_text_document\.idx is truncated"):
        check_data_files([garbage], TINY_VOCAB)
    with pytest.raises(DataError, match="--seq-length 0 must be positive"):
        build_split_datasets([prefix], "8,1,1", 0, (8, 0, 0), 1, TINY_VOCAB, EOD)
    with pytest.raises(DataError, match="end-of-document id 600 is outside the vocabulary of 512"):
        build_split_datasets([prefix], "8,1,1", SEQ, (8, 0, 0), 1, TINY_VOCAB, 600)

    max_id = int(np.fromfile(prefix + ".bin", dtype=np.uint16).max())
    with pytest.raises(DataError, match=rf"tiny_text_document\.bin holds token id {max_id}, outside the model's "
                                        rf"vocabulary of {max_id}.*--tokenizer-model"):
        build_split_datasets([prefix], "8,1,1", SEQ, (8, 0, 0), 1, max_id, EOD, cache_dir=str(cache))
    check_data_files([prefix], max_id + 1)  # the exact bound passes

    with pytest.raises(DataError, match=r"--split '999,0.5,0.5' leaves the valid split of .*tiny_text_document "
                                        r"empty \(120 documents in all\) while 8 valid samples are asked for"):
        build([prefix], split="999,0.5,0.5", samples=(8, 8, 8), cache=str(cache))
    assert not cache.exists()  # nothing was built for any of them


def test_big_files_are_checked_by_sampling(tiny_dataset, tmp_path, monkeypatch):
    from neon.data import checks

    prefix, _ = tiny_dataset
    bad = copy_prefix(prefix, tmp_path / "big_text_document")
    tokens = np.memmap(bad + ".bin", dtype=np.uint16, mode="r+")
    tokens[-1] = TINY_VOCAB + 5  # a foreign id at the very end
    tokens.flush()
    del tokens
    monkeypatch.setattr(checks, "FULL_SCAN_TOKENS", 100)
    monkeypatch.setattr(checks, "SAMPLE_WINDOW_TOKENS", 16)
    with pytest.raises(DataError, match=f"holds token id {TINY_VOCAB + 5}"):
        check_data_files([bad], TINY_VOCAB)
    (info,) = check_data_files([prefix], TINY_VOCAB)
    assert not info.max_is_exact


def test_demo_sized_preprocess_then_build_with_uint16_and_eod(tmp_path, tiny_tokenizer):
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_documents(30))
    res = preprocess([str(corpus)], tmp_path / "d", tiny_tokenizer, append_eod=True, show_progress=False)
    train = build_split_datasets([res.prefixes["text"]], "1", 8, (5, 0, 0), 0, TINY_VOCAB, EOD)[0]
    assert len(train) >= 5 and train[0]["tokens"].dtype.is_floating_point is False


def _build_on_rank(a: str, b: str, cache: str):
    import torch

    train, valid, _ = build_split_datasets(["0.3", a, "0.7", b], "9,1,0", SEQ, (50, 10, 0), 5, TINY_VOCAB, EOD,
                                     cache_dir=cache)
    return torch.stack([train[i]["tokens"] for i in range(len(train))]), int(valid[3]["dataset_id"])


@pytest.mark.slow
def test_two_ranks_build_the_same_cached_blend(tiny_dataset, tmp_path):
    """Under torch.distributed (as in training), rank 0 builds and caches, rank 1 loads the cache."""
    from tests.dist import run_distributed

    prefix, _ = tiny_dataset
    a = copy_prefix(prefix, tmp_path / "a_text_document")
    b = copy_prefix(prefix, tmp_path / "b_text_document")
    cache = tmp_path / "cache"
    (t0, v0), (t1, v1) = run_distributed(_build_on_rank, world_size=2,
                                         kwargs=dict(a=a, b=b, cache=str(cache)), timeout=300)
    assert t0.shape == (50, SEQ) and (t0 == t1).all() and v0 == v1
    assert len(list(cache.glob("*BlendedDataset-train-dataset_index.npy"))) == 1  # the blend is cached too
    # and a process without torch.distributed gets the very same samples from that cache
    assert (_build_on_rank(a, b, str(cache))[0] == t0).all()
