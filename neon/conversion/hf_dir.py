"""Hugging Face model directories: write (sharded safetensors + index, config, generation config,
modeling code, tokenizer) and read (lazily, tensor by tensor, after checking every shard is there).

A written directory is complete or absent: everything goes to a temporary sibling directory that
is renamed into place at the end.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from neon.conversion.errors import ConversionError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_DIR = Path(__file__).resolve().parents[1] / "hf"


# --- writing --------------------------------------------------------------------------------


class Staging:
    """`with Staging(dest) as tmp:` write into tmp; on success tmp becomes dest, on failure it is removed."""

    def __init__(self, dest: str | os.PathLike, overwrite: bool = False):
        self.dest = Path(dest)
        if self.dest.exists() and not self.dest.is_dir():
            raise ConversionError(f"--save {self.dest}: is a file. Fix: give a directory path.")
        if self.dest.is_dir() and any(self.dest.iterdir()) and not overwrite:
            raise ConversionError(f"--save {self.dest}: the directory exists and is not empty. Fix: choose a new "
                                  f"directory, or pass --overwrite to replace it.")

    def __enter__(self) -> Path:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.dest.exists():
            shutil.rmtree(self.dest)
        os.rename(self.tmp, self.dest)
        return False


def write_safetensors(out_dir: Path, plan: dict[str, torch.Tensor], produce: Callable[[list[str]], dict],
                      max_shard_size: int | str = "5GB", progress: bool = True) -> dict:
    """Write the tensors of `plan` (name -> meta tensor with the final shape/dtype, in writing order)
    into safetensors shards + model.safetensors.index.json. `produce(names)` returns the real
    tensors of those names; it is called once per shard, so one shard is in memory at a time.
    Returns the index."""
    split = split_torch_state_dict_into_shards(plan, max_shard_size=max_shard_size)
    weight_map = {}
    bar = tqdm(total=sum(t.numel() * t.element_size() for t in plan.values()), unit="B", unit_scale=True,
               desc="writing safetensors", disable=not progress)
    for filename, names in split.filename_to_tensors.items():
        tensors = produce(names)
        shard = {}
        for name in names:
            t = tensors[name]
            want = plan[name]
            if t.shape != want.shape or t.dtype != want.dtype:
                raise ConversionError(f"tensor {name}: produced {tuple(t.shape)} {t.dtype}, planned "
                                      f"{tuple(want.shape)} {want.dtype} (a bug in the weight mapping)")
            shard[name] = t.contiguous()
        save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
        for name in names:
            weight_map[name] = filename
            bar.update(plan[name].numel() * plan[name].element_size())
        del shard, tensors
    bar.close()
    index = {"metadata": {"total_size": split.metadata.get("total_size", 0)}, "weight_map": weight_map}
    (out_dir / SAFE_WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


SHIPPED = ("neon.io.", "neon.errors")  # neon modules an export carries: plain PyTorch, importing only each other
NEON_IMPORT = re.compile(r"^(\s*)from neon\.(?:io\.(\w+)|(errors)) import ", re.MULTILINE)


def self_contained(source: str, name: str) -> str:
    """`source` with its imports of shipped neon modules made relative (`from neon.io.store import`
    -> `from .store import`, `from neon.errors import` -> `from .errors import`). Any other import
    of neon is a ConversionError: the file would not load next to the model without Neon."""
    rewritten = NEON_IMPORT.sub(lambda m: f"{m.group(1)}from .{m.group(2) or m.group(3)} import ", source)
    for node in ast.walk(ast.parse(rewritten)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        bad = [n for n in names if n == "neon" or n.startswith("neon.")]
        if bad:
            raise ConversionError(f"{name}: imports {bad[0]} (line {node.lineno}), which an exported model cannot "
                                  f"carry. Fix: import only torch, numpy, the standard library, neon.errors and "
                                  f"neon.io.* in code the export ships.")
    return rewritten


def _imports(source: str, here: Optional[Path]) -> list[tuple[str, Optional[Path]]]:
    """(file name, path) of the neon modules `source` (a file in `here`) imports: shipped ones
    (path None until resolved) and relative ones."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom) or not node.module:
            continue
        if node.level == 1 and here is not None:
            found.append((f"{node.module}.py", here / f"{node.module}.py"))
        elif node.level == 0 and (node.module.startswith(SHIPPED[0]) or node.module == SHIPPED[1]):
            found.append((node.module.rsplit(".", 1)[-1] + ".py", None))
    return found


def _module_path(name: str) -> Path:
    """The source file of shipped module `name` (a file name: store.py -> neon/io/store.py)."""
    module = "neon.errors" if name == "errors.py" else f"neon.io.{name[:-3]}"
    return Path(importlib.import_module(module).__file__)


def copy_modeling_code(out_dir: Path, extra: Optional[dict[str, str]] = None) -> list[str]:
    """Write configuration_neon.py, modeling_neon.py, the neon modules they import (the IO kinds,
    neon/errors.py: the same code training runs) and `extra` ({file name: source}, e.g. the
    registry of the IO kinds the model uses and their modules), each self-contained (neon
    imports made relative), into out_dir. Returns the file names."""
    sources = dict(extra or {})
    pending = [(p.name, p) for p in (HF_DIR / "configuration_neon.py", HF_DIR / "modeling_neon.py")]
    pending += [(n, None) for n in sources]
    done = set()
    while pending:
        name, path = pending.pop()
        if name in done:
            continue
        done.add(name)
        if name not in sources:
            path = path or _module_path(name)
            sources[name] = path.read_text()
        pending += _imports(sources[name], path.parent if path is not None else None)
    for name, source in sources.items():
        (out_dir / name).write_text(self_contained(source, name))
    return sorted(sources)


# --- tokenizer ------------------------------------------------------------------------------


def load_sentencepiece(path: str | os.PathLike | None):
    import sentencepiece as spm

    if path is None:
        raise ConversionError("no tokenizer: the checkpoint's config names no data.tokenizer_model. Fix: pass "
                              "--tokenizer-model <the sentencepiece .model used in training>, or --no-tokenizer.")
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"tokenizer model {str(path)!r} does not exist. Fix: pass --tokenizer-model with the "
                              f"sentencepiece .model file used in training (the path saved in the checkpoint is "
                              f"relative to the training run's directory), or --no-tokenizer.")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise ConversionError(f"tokenizer model {str(path)!r} is not a sentencepiece model ({e}). Fix: pass the "
                              f".model file tools/train_tokenizer.py wrote.") from e
    return sp


def load_tokenizer(path: str | os.PathLike | None, tokenizer_type: Optional[str] = None):
    """The training tokenizer (neon.data.tokenizer: sentencepiece .model or a Hugging Face
    tokenizer.json directory), ConversionError naming the fix if it is missing or unreadable."""
    from neon.data.errors import DataError
    from neon.data.tokenizer import load_tokenizer as load

    if path is None:
        raise ConversionError("no tokenizer: the checkpoint's config names no data.tokenizer_model. Fix: pass "
                              "--tokenizer-model <the tokenizer used in training>, or --no-tokenizer.")
    if not Path(path).exists():
        raise ConversionError(f"tokenizer {str(path)!r} does not exist. Fix: pass --tokenizer-model with the "
                              f"tokenizer used in training (the path saved in the checkpoint is relative to the "
                              f"training run's directory), or --no-tokenizer.")
    try:
        return load(path, tokenizer_type)
    except DataError as e:
        raise ConversionError(f"{e} (pass --tokenizer-model with the tokenizer used in training, or "
                              f"--no-tokenizer)") from e


def check_vocab(tok, path, vocab_size: int, multiple: int) -> None:
    """The tokenizer fits the model: vocab_size lies between the tokenizer's size and that size
    padded up to `multiple` (Megatron-LM's --make-vocab-size-divisible-by x TP)."""
    n = tok.vocab_size
    padded = -(-n // multiple) * multiple
    if not n <= vocab_size <= padded:
        raise ConversionError(f"tokenizer {str(path)!r} has {n} tokens but the model's vocab_size is {vocab_size} "
                              f"(expected {n} up to {n} padded to a multiple of {multiple} = {padded}): this is "
                              f"not the tokenizer the model was trained with. Fix: pass the right --tokenizer-model.")


def special_tokens(tok) -> dict:
    """Special tokens as the tokenizer defines them (None where it has none)."""
    def piece(i):
        return tok.id_to_piece(i) if i >= 0 else None

    return dict(unk_token=piece(tok.unk), bos_token=piece(tok.bos), eos_token=piece(tok.eos), pad_token=piece(tok.pad))


def special_ids(tok) -> dict:
    return {name: (i if i >= 0 else None) for name, i in
            (("bos_token_id", tok.bos), ("eos_token_id", tok.eos), ("pad_token_id", tok.pad))}


def write_tokenizer(tok, out_dir: Path) -> None:
    """The training tokenizer, encoding exactly the training ids with AutoTokenizer's defaults:
    - sentencepiece: tokenizer.model + tokenizer_config.json + tokenization_neon.py (loads with
      AutoTokenizer.from_pretrained(dir, trust_remote_code=True));
    - Hugging Face: its tokenizer.json without the post-processor (training added no bos/eos, so
      neither does the export; preprocessing appended eod) + tokenizer_config.json for
      PreTrainedTokenizerFast."""
    from neon.data.tokenizer import HFTokenizer

    if isinstance(tok, HFTokenizer):
        spec = json.loads(tok.file.read_text())
        spec["post_processor"] = None
        (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(1e30),
                  **{k: v for k, v in special_tokens(tok).items() if v is not None}}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return
    from neon.hf.tokenization_neon import NeonTokenizer

    hf = NeonTokenizer(vocab_file=str(tok.model_path), **special_tokens(tok))
    if len(hf) != tok.vocab_size:
        raise ConversionError(f"tokenizer {str(tok.model_path)!r}: the Hugging Face tokenizer has {len(hf)} tokens, "
                              f"sentencepiece {tok.vocab_size} (special tokens were added)")
    hf.save_pretrained(str(out_dir))


# --- reading --------------------------------------------------------------------------------


class HFWeights:
    """Tensors of an HF directory (model.safetensors, or shards listed by the index), read on demand."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        index_path, single = self.dir / SAFE_WEIGHTS_INDEX, self.dir / SAFE_WEIGHTS_NAME
        if index_path.is_file():
            try:
                self.weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ConversionError(f"{index_path}: not a safetensors index ({e}). Fix: re-download the model "
                                      f"or re-run the export.") from e
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                self.weight_map = {k: SAFE_WEIGHTS_NAME for k in f.keys()}
        else:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = (f" (found {bins}: PyTorch .bin weights; load and save_pretrained them with transformers to get "
                    f"safetensors)" if bins else "")
            raise ConversionError(f"{self.dir}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX}{hint}. Fix: give a "
                                  f"Hugging Face model directory with safetensors weights.")
        files = sorted(set(self.weight_map.values()))
        missing = [f for f in files if not (self.dir / f).is_file()]
        if missing:
            raise ConversionError(f"{self.dir}: missing safetensors shard(s) {missing} of the {len(files)} the index "
                                  f"lists. Fix: download / copy the complete model directory.")
        self._open: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> Iterable[str]:
        return self.weight_map.keys()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"{self.dir}: tensor {name!r} is missing from the weights. Fix: check that the "
                                  f"config.json matches the weights (an incomplete or different model?).")
        filename = self.weight_map[name]
        if filename not in self._open:
            self._open[filename] = safe_open(str(self.dir / filename), framework="pt")
        return self._open[filename].get_tensor(name)

    def close(self) -> None:
        self._open.clear()
