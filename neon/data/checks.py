"""Checks of .bin/.idx data files, cheap enough to run before any expensive work.

A missing, truncated or mismatched file (a token id the model's vocabulary does not have) raises
DataError naming the file and the fix. The .idx header is read directly (megatron-core's reader
only asserts); the token-id check is a max over the memory-mapped tokens, exact for files up to
`FULL_SCAN_TOKENS` tokens and sampled in evenly spaced windows above that.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, get_bin_path, get_idx_path

from neon.data.errors import DataError

FULL_SCAN_TOKENS = 1 << 27  # 128M tokens: scanning them all takes about a second
SAMPLE_WINDOWS = 512
SAMPLE_WINDOW_TOKENS = 1 << 16
_HEADER_BYTES = 34  # magic 9 + version 8 + dtype 1 + sequence count 8 + document count 8


@dataclass(frozen=True)
class DataFileInfo:
    prefix: str
    num_sequences: int
    num_documents: int
    num_tokens: int
    dtype: type
    max_token_id: int
    max_is_exact: bool


def parse_data_path(data_path: list[str] | str) -> tuple[list[str], list[float] | None]:
    """Megatron-LM's --data-path: `prefix1 prefix2 ...` or `w1 prefix1 w2 prefix2 ...` -> (prefixes, weights)."""
    if isinstance(data_path, (str, os.PathLike)):
        data_path = str(data_path).split()
    items = [str(x).strip() for x in data_path if str(x).strip()]
    if not items:
        raise DataError("--data-path is empty; give one or more dataset prefixes (the path of the .bin/.idx "
                        "files without the extension), optionally each preceded by a weight.")

    def as_weight(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:
            return None

    if len(items) % 2 == 0 and all(as_weight(w) is not None for w in items[0::2]):
        weights = [as_weight(w) for w in items[0::2]]
        prefixes = items[1::2]
        if any(as_weight(p) is not None and not os.path.exists(get_idx_path(p)) for p in prefixes):
            raise DataError(f"--data-path {' '.join(items)!r} has a number where a prefix belongs; "
                            f"write it as 'w1 prefix1 w2 prefix2 ...'.")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"--data-path weights {weights} must be non-negative and not all zero.")
        return prefixes, weights
    numbers = [s for s in items if as_weight(s) is not None and not os.path.exists(get_idx_path(s))]
    if numbers:
        raise DataError(f"--data-path {' '.join(items)!r} mixes weights and prefixes: give a weight before every "
                        f"prefix ('w1 prefix1 w2 prefix2 ...') or none at all.")
    return items, None


def _read_index_header(prefix: str) -> tuple[type, int, int]:
    idx_path = get_idx_path(prefix)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != _INDEX_HEADER:
        raise DataError(f"{idx_path} is not a megatron indexed-dataset index (bad header); recreate it with "
                        f"tools/preprocess_data.py.")
    (version,) = struct.unpack("<Q", head[9:17])
    (code,) = struct.unpack("<B", head[17:18])
    num_sequences, num_documents = struct.unpack("<QQ", head[18:34])
    if version != 1:
        raise DataError(f"{idx_path} has index version {version}, megatron-core reads version 1; recreate it with "
                        f"tools/preprocess_data.py.")
    try:
        dtype = DType.dtype_from_code(code)
    except ValueError as err:
        raise DataError(f"{idx_path} names an unknown token dtype code {code}; recreate it with "
                        f"tools/preprocess_data.py.") from err
    return dtype, num_sequences, num_documents


def _max_token(tokens: np.ndarray) -> tuple[int, int, bool]:
    """(min, max, exact) of the token ids: exact for small arrays, sampled windows for big ones."""
    n = tokens.shape[0]
    lo, hi = None, None
    if n <= FULL_SCAN_TOKENS:
        starts, width, exact = range(0, n, 1 << 24), 1 << 24, True
    else:
        starts = np.linspace(0, n - SAMPLE_WINDOW_TOKENS, SAMPLE_WINDOWS).astype(np.int64).tolist() + [n - 1]
        width, exact = SAMPLE_WINDOW_TOKENS, False
    for s in starts:
        chunk = tokens[s:s + width]
        if chunk.size:
            cmin, cmax = int(chunk.min()), int(chunk.max())
            lo = cmin if lo is None else min(lo, cmin)
            hi = cmax if hi is None else max(hi, cmax)
    return (lo or 0), (hi or 0), exact


def check_data_file(prefix: str, vocab_size: int | None = None) -> DataFileInfo:
    """Check one dataset prefix (`prefix`.bin + `prefix`.idx); see the module docstring."""
    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
    if missing:
        raise DataError(f"data file {' and '.join(missing)} not found (data prefix {prefix!r}); give --data-path the "
                        f"prefix of files made by tools/preprocess_data.py (for example "
                        f"'my-corpus_text_document' for my-corpus_text_document.bin/.idx).")
    dtype, num_sequences, num_documents = _read_index_header(prefix)
    itemsize = np.dtype(dtype).itemsize
    need_idx = _HEADER_BYTES + num_sequences * (4 + 8) + num_documents * 8
    idx_size = os.path.getsize(idx_path)
    if idx_size < need_idx:
        raise DataError(f"{idx_path} is truncated: {idx_size} bytes, its header needs {need_idx}; recreate it with "
                        f"tools/preprocess_data.py.")
    if num_sequences == 0:
        raise DataError(f"{prefix} holds no documents; preprocess a non-empty input or drop it from --data-path.")
    index = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(index, dtype=np.int32, count=num_sequences, offset=_HEADER_BYTES)
    pointers = np.frombuffer(index, dtype=np.int64, count=num_sequences, offset=_HEADER_BYTES + 4 * num_sequences)
    doc_idx = np.frombuffer(index, dtype=np.int64, count=num_documents, offset=_HEADER_BYTES + 12 * num_sequences)
    if num_documents == 0 or int(doc_idx[-1]) != num_sequences:
        raise DataError(f"{idx_path} is inconsistent (document index ends at "
                        f"{int(doc_idx[-1]) if num_documents else None}, {num_sequences} sequences); recreate it "
                        f"with tools/preprocess_data.py.")
    need_bin = int(pointers[-1]) + int(lengths[-1]) * itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size < need_bin:
        raise DataError(f"{bin_path} is truncated: {bin_size} bytes but {idx_path} describes {need_bin} "
                        f"({need_bin // itemsize} tokens); the copy or the preprocessing did not finish. Copy it again "
                        f"or rerun tools/preprocess_data.py.")
    if bin_size != need_bin:
        raise DataError(f"{bin_path} has {bin_size} bytes but {idx_path} describes {need_bin}: the .bin and .idx "
                        f"come from different runs. Rerun tools/preprocess_data.py for this prefix.")
    num_tokens = need_bin // itemsize
    tokens = np.memmap(bin_path, mode="r", dtype=dtype, shape=(num_tokens,))
    if vocab_size is not None and np.issubdtype(dtype, np.unsignedinteger) and np.iinfo(dtype).max < vocab_size:
        lo, hi, exact = 0, -1, False  # every id this dtype can hold is in the vocabulary
    else:
        lo, hi, exact = _max_token(tokens)
    del tokens, index
    if vocab_size is not None and (hi >= vocab_size or lo < 0):
        bad = hi if hi >= vocab_size else lo
        raise DataError(f"{bin_path} holds token id {bad}, outside the model's vocabulary of {vocab_size}: the data "
                        f"was tokenized with another tokenizer. Preprocess it again with the --tokenizer-model the "
                        f"model uses, or set the model's vocab size to at least {hi + 1}.")
    return DataFileInfo(prefix, num_sequences, num_documents - 1, num_tokens, dtype, hi, exact)


def check_data_files(data_path: list[str] | str, vocab_size: int | None) -> list[DataFileInfo]:
    """Check every prefix of a Megatron-style --data-path (weights allowed); raise DataError on the first bad one."""
    prefixes, _ = parse_data_path(data_path)
    return [check_data_file(p, vocab_size) for p in prefixes]
