"""Text or JSONL -> megatron-core indexed datasets (.bin/.idx), tokenized by worker processes.

The output is what Megatron-LM's tools/preprocess_data.py writes, through the same
megatron-core IndexedDatasetBuilder: `{output_prefix}_{key}_document.bin/.idx` for every JSON
key, token dtype uint16 when the vocabulary fits in it (int32 otherwise), one sequence per
document, an end-of-document token after each document with `append_eod`. Documents keep their
input order whatever the number of workers; documents that tokenize to nothing are skipped.
Outputs are written under temporary names and renamed at the end, .idx last, so a crash never
leaves a complete-looking dataset.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path
from tqdm import tqdm

from neon.data.documents import TEXT_UNITS, expand_inputs, is_jsonl, text_from_json_line
from neon.data.errors import DataError
from neon.data.tokenizer import load_tokenizer

LEVEL = "document"


@dataclass
class PreprocessResult:
    prefixes: dict[str, str]
    """JSON key -> output prefix (give it to --data-path)."""
    num_documents: int = 0
    num_tokens: dict[str, int] = field(default_factory=dict)
    num_skipped: int = 0
    input_bytes: int = 0
    seconds: float = 0.0

    @property
    def docs_per_second(self) -> float:
        return self.num_documents / max(self.seconds, 1e-9)

    @property
    def mb_per_second(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


def output_prefix_for(output_prefix: str | Path, key: str) -> str:
    """Megatron-LM's naming: `{output_prefix}_{key}_document`."""
    return f"{output_prefix}_{key}_{LEVEL}"


# ---- worker side: a module-level tokenizer per process, as Megatron-LM's Encoder does ----------
_worker: dict = {}


def _init_worker(model_path: str, json_keys: tuple[str, ...], append_eod: bool, dtype) -> None:
    tok = load_tokenizer(model_path)
    _worker.update(tok=tok, keys=json_keys, eod=tok.eod if append_eod else None, dtype=dtype)


def _encode(item: tuple[bytes, bool, str]) -> tuple[list[np.ndarray], int]:
    """One raw document (a JSONL line or a text document) -> token arrays, one per key."""
    raw, json_line, where = item
    text = raw.decode("utf-8", errors="strict")
    out = []
    for key in _worker["keys"]:
        doc = text_from_json_line(text, key, where) if json_line else text
        ids = _worker["tok"].encode(doc) if doc else []
        if ids and _worker["eod"] is not None:
            ids.append(_worker["eod"])
        out.append(np.asarray(ids, dtype=_worker["dtype"]))
    return out, len(raw)


def _raw_documents(files: list[Path], input_format: str, text_unit: str) -> Iterator[tuple[bytes, bool, str]]:
    """Undecoded documents (decoding and JSON parsing happen in the workers)."""
    for path in files:
        json_file = is_jsonl(path, input_format)
        with open(path, "rb") as f:
            if json_file or text_unit == "line":
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        yield (line if json_file else line.rstrip(b"\r\n")), json_file, f"{path}:{lineno}"
            elif text_unit == "file":
                data = f.read()
                if data.strip():
                    yield data, False, str(path)
            else:  # paragraph: blank-line separated
                para, start = [], 1
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        if not para:
                            start = lineno
                        para.append(line)
                    elif para:
                        yield b"".join(para).rstrip(b"\r\n"), False, f"{path}:{start}"
                        para = []
                if para:
                    yield b"".join(para).rstrip(b"\r\n"), False, f"{path}:{start}"


def preprocess(inputs: list[str] | str, output_prefix: str | Path, tokenizer_model: str | Path,
               json_keys: list[str] | tuple[str, ...] = ("text",), workers: int = 1, append_eod: bool = True,
               input_format: str = "auto", text_unit: str = "line", chunk_size: int = 32,
               show_progress: bool = True, tokenizer_type: str | None = None) -> PreprocessResult:
    """Tokenize `inputs` into `{output_prefix}_{key}_document.bin/.idx`; see the module docstring."""
    if workers < 1:
        raise DataError(f"--workers {workers} must be at least 1.")
    if text_unit not in TEXT_UNITS:
        raise DataError(f"--text-unit {text_unit!r} is unknown; use one of {TEXT_UNITS}.")
    json_keys = tuple(json_keys)
    if not json_keys:
        raise DataError("--json-keys is empty; name the key that holds the text (Megatron-LM's default is 'text').")
    files = expand_inputs(inputs)
    if any(not is_jsonl(f, input_format) for f in files) and len(json_keys) > 1:
        raise DataError(f"--json-keys {list(json_keys)} names several keys but some inputs are plain text; plain text "
                        f"has one document stream, so give one key (it names the output).")
    tok = load_tokenizer(tokenizer_model, tokenizer_type)  # fails early on a bad model
    dtype = DType.optimal_dtype(tok.vocab_size)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)

    prefixes = {key: output_prefix_for(output_prefix, key) for key in json_keys}
    tmp = {key: (get_bin_path(p) + ".tmp", get_idx_path(p) + ".tmp") for key, p in prefixes.items()}
    builders = {key: IndexedDatasetBuilder(tmp[key][0], dtype=dtype) for key in json_keys}
    result = PreprocessResult(prefixes=prefixes, num_tokens={key: 0 for key in json_keys})
    total_bytes = sum(f.stat().st_size for f in files)

    start = time.perf_counter()
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="preprocessing",
               disable=not show_progress, mininterval=0.5)
    try:
        with ctx.Pool(workers, initializer=_init_worker,
                      initargs=(str(tokenizer_model), json_keys, append_eod, dtype)) as pool:
            encoded = pool.imap(_encode, _raw_documents(files, input_format, text_unit), chunk_size)
            for docs, nbytes in encoded:
                result.input_bytes += nbytes
                bar.update(nbytes)
                if all(d.size == 0 for d in docs):
                    result.num_skipped += 1
                    continue
                result.num_documents += 1
                for key, ids in zip(json_keys, docs):
                    builders[key].add_document(ids, [ids.size])
                    result.num_tokens[key] += ids.size
                if result.num_documents % 1000 == 0:
                    bar.set_postfix(docs=result.num_documents, refresh=False)
        for key, builder in builders.items():
            builder.finalize(tmp[key][1])
    except BaseException:
        for key, builder in builders.items():
            builder.data_file.close()
            for path in tmp[key]:
                if os.path.exists(path):
                    os.remove(path)
        raise
    finally:
        bar.close()
    if result.num_documents == 0:
        for key in json_keys:
            for path in tmp[key]:
                os.remove(path)
        raise DataError(f"no document in {[str(f) for f in files]} has any text under {list(json_keys)}; check "
                        f"--input and --json-keys.")
    for key, prefix in prefixes.items():
        os.replace(tmp[key][0], get_bin_path(prefix))
        os.replace(tmp[key][1], get_idx_path(prefix))
    result.seconds = time.perf_counter() - start
    if show_progress:
        print(f"Processed {result.num_documents} documents ({result.num_skipped} empty skipped), "
              f"{sum(result.num_tokens.values())} tokens in {result.seconds:.1f} s "
              f"({result.docs_per_second:.0f} docs/s, {result.mb_per_second:.2f} MB/s) with {workers} worker(s)",
              flush=True)
        for prefix in prefixes.values():
            print(f"wrote {prefix}.bin/.idx  (use --data-path {prefix})", flush=True)
    return result
