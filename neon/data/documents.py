"""Reading raw documents from text or JSONL files, shared by tokenizer training and preprocessing.

JSONL: one JSON object per line, the text under one key (``--json-keys``, default ``text``), as
Megatron-LM's tools/preprocess_data.py reads it. Plain text: by default one document per line;
``text_unit="file"`` makes every file one document, ``"paragraph"`` splits at blank lines.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

from neon.data.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_UNITS = ("line", "paragraph", "file")


def expand_inputs(inputs: list[str] | str) -> list[Path]:
    """Files named by paths or glob patterns, in the order given (globs sorted); errors name the missing one."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for pattern in inputs:
        pattern = str(pattern)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"--input {pattern!r} matches no file; check the path or the glob pattern.")
        for m in matches:
            p = Path(m)
            if not p.is_file():
                raise DataError(f"input file {str(p)!r} does not exist or is not a file; check --input.")
            files.append(p)
    return files


def is_jsonl(path: Path, input_format: str = "auto") -> bool:
    if input_format == "jsonl":
        return True
    if input_format == "text":
        return False
    if input_format != "auto":
        raise DataError(f"input format {input_format!r} is unknown; use auto, jsonl or text.")
    return path.suffix.lower() in JSONL_SUFFIXES


def text_from_json_line(line: str, key: str, where: str = "") -> str | None:
    """The text under `key` of one JSONL line (None for a blank line)."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg}); each line of a JSONL file must be one JSON "
                        f"object.") from err
    if not isinstance(record, dict) or key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no key {key!r} in the JSON record (it has {keys}); pass --json-keys with the key "
                        f"that holds the text.")
    text = record[key]
    if isinstance(text, list):  # sentence-split records, as Megatron-LM's --split-sentences writes them
        text = "".join(text)
    if not isinstance(text, str):
        raise DataError(f"{where}: key {key!r} holds {type(text).__name__}, not text.")
    return text


def iter_text_documents(path: Path, text_unit: str = "line") -> Iterator[str]:
    """Documents of a plain-text file."""
    if text_unit not in TEXT_UNITS:
        raise DataError(f"text unit {text_unit!r} is unknown; use one of {TEXT_UNITS}.")
    with open(path, encoding="utf-8") as f:
        if text_unit == "file":
            text = f.read()
            if text.strip():
                yield text
        elif text_unit == "line":
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield line
        else:
            para: list[str] = []
            for line in f:
                if line.strip():
                    para.append(line)
                elif para:
                    yield "".join(para).rstrip("\n")
                    para = []
            if para:
                yield "".join(para).rstrip("\n")


def iter_documents(files: list[Path], json_key: str | list[str] = "text", input_format: str = "auto",
                   text_unit: str = "line") -> Iterator[str]:
    """Every document of every file, in order (JSONL: the text under each of the keys)."""
    keys = [json_key] if isinstance(json_key, str) else list(json_key)
    for path in files:
        if is_jsonl(path, input_format):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    for key in keys:
                        text = text_from_json_line(line, key, where=f"{path}:{lineno}")
                        if text:
                            yield text
        else:
            yield from iter_text_documents(path, text_unit)
