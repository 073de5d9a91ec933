"""Train/valid/test datasets for pretraining: megatron-core's GPTDataset through its
BlendedMegatronDatasetBuilder, as Megatron-LM's pretrain_gpt.py builds them.

- `data_path` is Megatron-LM's --data-path: plain prefixes, or `w1 prefix1 w2 prefix2 ...` to blend
  the datasets in proportion to the weights.
- `split` is Megatron-LM's --split ("949,50,1"): each dataset's documents are cut into contiguous
  train/valid/test ranges in that proportion.
- `per_split` is Megatron-LM's --train-data-path / --valid-data-path / --test-data-path: a blend
  (as data_path) for each split, used whole; no split string. A split without one has no dataset.
- `mock` is Megatron-LM's --mock-data: megatron-core's MockGPTDataset (documents of random
  length whose tokens count up modulo the vocabulary, each ended by EOD); no files.
- Documents are packed into samples of seq_length + 1 tokens across document boundaries (the EOD
  token between them); the sample order is shuffled with `seed` (same seed, same order) and the
  indices are cached in `cache_dir` (Megatron's --data-cache-path; default `<prefix>/cache/`).
- Each item: {"tokens", "labels", "loss_mask", "position_ids"}, tensors of length seq_length
  (blended datasets add "dataset_id"). Megatron-LM's document flags: `eod_mask_loss` (no loss where
  the input token is EOD), `reset_position_ids` (positions restart after each EOD), and
  `reset_attention_mask`, which adds "documents": each token's document number in the sample (the
  count of EODs before it), what Neon's attention and IO context windows mask with
  (neon/attention.py). A token attends to no earlier document.
- A split asked for samples but left without documents by --split: DataError for train and
  valid; a warning and None for test.

The data files are checked (check_data_files) before anything is built.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import MockGPTDataset
from megatron.core.datasets.indexed_dataset import get_idx_path

from megatron_plugins import indexed_dataset
from neon.data.checks import DataFileInfo, check_data_files, parse_data_path
from neon.data.errors import DataError
from neon.data.gpt_dataset import GPTDataset, NeonGPTDatasetConfig
from neon.data.helpers import ensure_helpers

indexed_dataset.install()  # a run interrupted while it opens its data ends without a traceback
logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")


@dataclasses.dataclass
class DatasetTokenizer:
    """What megatron-core's GPTDataset needs of a tokenizer: vocab size, EOD and pad ids.

    pad = -1 (megatron's own default) means padding never collides with a real token: padded
    positions become token 0 with loss_mask 0.
    """

    vocab_size: int
    eod: int
    pad: int = -1

    @property
    def unique_identifiers(self) -> OrderedDict:  # part of megatron's dataset cache key
        return OrderedDict(cls=type(self).__name__, vocab_size=self.vocab_size, eod=self.eod, pad=self.pad)


def parse_split(split: str) -> list[float]:
    """Megatron-LM's --split ("949,50,1", "98,2", "1") -> normalised [train, valid, test]."""
    parts = [p.strip() for p in str(split).split(",")]
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", p) for p in parts):
        raise DataError(f"--split {split!r} is not valid; give up to three non-negative numbers for train, valid and "
                        f"test, comma separated, like '949,50,1'.")
    if sum(float(p) for p in parts) <= 0:
        raise DataError(f"--split {split!r} gives every split zero weight; give train a positive weight.")
    return parse_and_normalize_split(split)


def _split_ranges(split_vector: list[float], n: int) -> list[Optional[tuple[int, int]]]:
    """The [begin, end) sequence range of each split, exactly as the builder cuts a dataset of n sequences."""
    ranges = []
    for bookends in convert_split_vector_to_split_matrix(split_vector):
        ranges.append(None if bookends is None else
                      (int(round(bookends[0] * float(n))), int(round(bookends[1] * float(n)))))
    return ranges


def _empty_splits(infos: list[DataFileInfo], split: str, split_vector: list[float],
                  num_samples: tuple[int, int, int]) -> set[int]:
    """Splits asked for samples whose document range is empty in some dataset (megatron-core would
    loop forever on them). Train or valid: DataError. Test (Megatron's habitual "949,50,1" on small
    data, and pretraining rarely reads it): a warning, and that split is not built."""
    empty = set()
    for info in infos:
        lengths = np.memmap(get_idx_path(info.prefix), mode="r", dtype=np.int32, offset=34,
                            shape=(info.num_sequences,))
        for i, rng in enumerate(_split_ranges(split_vector, info.num_sequences)):
            if num_samples[i] <= 0 or rng is None or (rng[1] > rng[0] and int(lengths[rng[0]:rng[1]].sum()) > 0):
                continue
            msg = (f"--split {split!r} leaves the {SPLIT_NAMES[i]} split of {info.prefix} empty ({info.num_documents} "
                   f"documents in all) while {num_samples[i]} {SPLIT_NAMES[i]} samples are asked for")
            if i < 2:
                raise DataError(f"{msg}; give that split a bigger share of --split, use more data, or ask for no "
                                f"{SPLIT_NAMES[i]} samples.")
            warnings.warn(f"{msg}: there is no test set.", stacklevel=3)
            empty.add(i)
    return empty


class WithDocuments(torch.utils.data.Dataset):
    """A dataset whose items also carry "documents" [seq_length]: the number of EOD tokens before
    each input token (megatron's reset_attention_mask: a token after an EOD starts a new document)."""

    def __init__(self, dataset, eod: int):
        self.dataset, self.eod = dataset, eod

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx):
        item = self.dataset[idx]
        ends = (item["tokens"] == self.eod).long()
        item["documents"] = torch.cumsum(ends, 0) - ends  # EODs strictly before each token
        return item


def per_split_paths(data) -> Optional[tuple]:
    """The `data` section's (train, valid, test) data paths, or None when none is given."""
    paths = (data.train_data_path, data.valid_data_path, data.test_data_path)
    return paths if any(paths) else None


def build_datasets(data, schedule, *, vocab_size: int, eod_id: int,
                   is_built_on_rank: Optional[Callable[[], bool]] = None):
    """A run's (train, valid, test) datasets from its `data` section (data_path or the per-split
    paths or mock_data, split, seq_length, data_cache_path, the document flags) and `schedule`
    section (seed, and the sample counts Megatron-LM asks for: train_iters x global_batch_size for
    train, eval_iters x global_batch_size for valid and for test). See build_split_datasets."""
    gbs = schedule.global_batch_size
    num_samples = (schedule.train_iters * gbs, schedule.eval_iters * gbs, schedule.eval_iters * gbs)
    return build_split_datasets(data.data_path, data.split, data.seq_length, num_samples, schedule.seed,
                                vocab_size, eod_id, cache_dir=data.data_cache_path,
                                is_built_on_rank=is_built_on_rank, per_split=per_split_paths(data),
                                mock=data.mock_data, eod_mask_loss=data.eod_mask_loss,
                                reset_position_ids=data.reset_position_ids,
                                reset_attention_mask=data.reset_attention_mask)


def build_split_datasets(data_path: list[str], split: str, seq_length: int, num_samples: tuple[int, int, int],
                         seed: int, vocab_size: int, eod_id: int, cache_dir: Optional[str] = None, *,
                         is_built_on_rank: Optional[Callable[[], bool]] = None, pad_id: int = -1,
                         per_split: Optional[tuple] = None, mock: bool = False,
                         eod_mask_loss: bool = False, reset_position_ids: bool = False,
                         reset_attention_mask: bool = False):
    """(train, valid, test) megatron-core datasets; None for a split with zero samples (or, with
    per_split, without a path).

    num_samples: samples wanted per split, as Megatron-LM computes them (train_iters *
    global_batch_size for train, ...); a split is repeated (in further shuffled epochs) to reach it.
    Call on every rank when torch.distributed is initialised: rank 0 builds and caches the indices
    first, the others load them. Ranks where `is_built_on_rank()` is False get (None, None, None).
    """
    if int(seq_length) <= 0:
        raise DataError(f"--seq-length {seq_length} must be positive.")
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise DataError(f"num_samples {tuple(num_samples)} must be three non-negative counts (train, valid, test).")
    if not 0 <= eod_id < vocab_size:
        raise DataError(f"the end-of-document id {eod_id} is outside the vocabulary of {vocab_size}; pass the "
                        f"tokenizer's eod and vocab_size.")
    num_samples = tuple(int(n) for n in num_samples)
    blend, blend_per_split = None, None
    if mock:
        dataset_class = MockGPTDataset
        parse_split(split)
    elif per_split is not None:
        dataset_class, split = GPTDataset, None
        num_samples = tuple(n if path else 0 for n, path in zip(num_samples, per_split))
        blend_per_split = [parse_data_path(path) if n else None for n, path in zip(num_samples, per_split)]
        for path, n in zip(per_split, num_samples):
            if n:
                check_data_files(path, vocab_size)
    else:
        dataset_class = GPTDataset
        split_vector = parse_split(split)
        blend = parse_data_path(data_path)
        infos = check_data_files(data_path, vocab_size)
        empty = _empty_splits(infos, split, split_vector, num_samples)
        num_samples = tuple(0 if i in empty else n for i, n in enumerate(num_samples))
    ensure_helpers()

    config = NeonGPTDatasetConfig(
        random_seed=int(seed), sequence_length=int(seq_length), blend=blend, blend_per_split=blend_per_split,
        split=split, path_to_cache=None if cache_dir is None else str(cache_dir), mmap_bin_files=True,
        tokenizer=DatasetTokenizer(vocab_size=int(vocab_size), eod=int(eod_id), pad=int(pad_id)),
        reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss, create_attention_mask=False,
    )
    if config.split_matrix is not None:  # splits nobody asked for are not built at all
        config.split_matrix = [m if n > 0 else None for m, n in zip(config.split_matrix, num_samples)]

    blends = [blend] if blend is not None else [b for b in blend_per_split or [] if b is not None]
    blended = any(len(prefixes) > 1 or weights is not None for prefixes, weights in blends)
    if blended and cache_dir is not None and not torch.distributed.is_initialized():
        config.path_to_cache, config.gpt_index_cache = None, str(cache_dir)  # see neon/data/gpt_dataset.py
    sizes = list(num_samples)
    built = BlendedMegatronDatasetBuilder(dataset_class, sizes, is_built_on_rank or (lambda: True), config).build()
    built = [None if ds is None or n == 0 or len(ds) == 0 else ds for ds, n in zip(built, num_samples)]
    if reset_attention_mask:
        built = [None if ds is None else WithDocuments(ds, int(eod_id)) for ds in built]
    return tuple(built)
