"""The tokenizer the data pipeline and the model share: `load_tokenizer(path)`.

- A sentencepiece `.model` file: NeonTokenizer. Special ids of models trained by
  tools/train_tokenizer.py (Mistral's layout plus a pad): unk=0, bos=1, eos=2, pad=3.
- A directory holding a Hugging Face `tokenizer.json` (or that file itself): HFTokenizer, through
  the `tokenizers` library (Megatron-LM's --tokenizer-type HuggingFaceTokenizer). Llama 3's,
  Mistral's, GPT-2's BPE.

The end-of-document token (`eod`) is the tokenizer's eos, as in Megatron-LM, so .bin/.idx files
from either tool agree. `encode` adds no special tokens (no bos, no eos); preprocessing appends
eod after each document. Ids a tokenizer does not define are -1.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from neon.data.errors import DataError


class NeonTokenizer:
    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise DataError(f"tokenizer model {str(self.model_path)!r} does not exist; train one with "
                            f"tools/train_tokenizer.py or pass the right --tokenizer-model.")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.model_path))
        except (OSError, RuntimeError) as err:
            raise DataError(f"tokenizer model {str(self.model_path)!r} is not a sentencepiece model ({err}); "
                            f"pass the .model file tools/train_tokenizer.py wrote.") from err

    @property
    def vocab_size(self) -> int:
        """Number of pieces; every id the tokenizer emits is below it."""
        return self.sp.GetPieceSize()

    @property
    def eod(self) -> int:
        """End-of-document id appended by preprocessing (= eos)."""
        return self.sp.eos_id()

    @property
    def eos(self) -> int:
        return self.sp.eos_id()

    @property
    def bos(self) -> int:
        return self.sp.bos_id()

    @property
    def pad(self) -> int:
        return self.sp.pad_id()

    @property
    def unk(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no bos/eos added."""
        return self.sp.EncodeAsIds(text)

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.IdToPiece(int(token_id))

    def __repr__(self) -> str:
        return (f"NeonTokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size}, eod={self.eod}, "
                f"bos={self.bos}, pad={self.pad})")


HF_TOKENIZER_FILE = "tokenizer.json"
# Megatron-LM's --tokenizer-type values Neon reads: the sentencepiece ones, and the Hugging Face one
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "NeonTokenizer")
HF_TYPES = ("HuggingFaceTokenizer",)
TOKENIZER_TYPES = SENTENCEPIECE_TYPES + HF_TYPES
# eos of tokenizers whose directory has no tokenizer_config.json naming it
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` library); eos from the directory's
    tokenizer_config.json (its `eos_token`), else the first of EOS_CANDIDATES the vocabulary has."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        self.file = path / HF_TOKENIZER_FILE if path.is_dir() else path
        self.model_path = path
        try:
            self.tok = Tokenizer.from_file(str(self.file))
        except Exception as err:  # the library raises its own Exception for unreadable JSON
            raise DataError(f"tokenizer {str(self.file)!r} is not a Hugging Face tokenizer.json ({err}); pass the "
                            f"directory holding the model's tokenizer.json.") from err
        self.config = _read_json(self.file.parent / "tokenizer_config.json")
        self._eos = self._special("eos_token", EOS_CANDIDATES)
        if self._eos < 0:
            raise DataError(f"tokenizer {str(self.file)!r} has no end-of-document token: its directory has no "
                            f"tokenizer_config.json naming `eos_token` and the vocabulary has none of "
                            f"{list(EOS_CANDIDATES)}. Fix: add a tokenizer_config.json with \"eos_token\".")

    def _special(self, key: str, candidates=()) -> int:
        token = self.config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        for name in ([token] if token else list(candidates)):
            token_id = self.tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return -1

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eos

    @property
    def eos(self) -> int:
        return self._eos

    @property
    def bos(self) -> int:
        return self._special("bos_token")

    @property
    def pad(self) -> int:
        return self._special("pad_token")

    @property
    def unk(self) -> int:
        return self._special("unk_token")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self.tok.id_to_token(int(token_id))

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.file)!r}, vocab_size={self.vocab_size}, eod={self.eod}, bos={self.bos})"


def _read_json(path: Path) -> dict:
    import json

    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path} is not JSON ({err}); fix or remove it.") from err


def is_hf_tokenizer(path: str | Path) -> bool:
    """A Hugging Face tokenizer: a directory with tokenizer.json, or a .json file."""
    path = Path(path)
    return (path / HF_TOKENIZER_FILE).is_file() if path.is_dir() else path.suffix == ".json"


def load_tokenizer(path: str | Path, tokenizer_type: str | None = None):
    """The tokenizer at `path`: HFTokenizer for a tokenizer.json (or its directory), else a
    sentencepiece NeonTokenizer. DataError naming the path and the fix if it is neither, or if
    `tokenizer_type` (Megatron-LM's --tokenizer-type; None: any) names the other kind."""
    path = Path(path)
    if tokenizer_type is not None:
        if tokenizer_type not in TOKENIZER_TYPES:
            raise DataError(f"--tokenizer-type {tokenizer_type} is not supported; use one of {list(TOKENIZER_TYPES)} "
                            f"(or leave it out: the --tokenizer-model path tells).")
        if (tokenizer_type in HF_TYPES) != is_hf_tokenizer(path):
            want = ("a directory holding a tokenizer.json" if tokenizer_type in HF_TYPES
                    else "a sentencepiece .model file")
            raise DataError(f"--tokenizer-type {tokenizer_type} needs {want}, and --tokenizer-model {str(path)!r} "
                            f"is not one; fix the path or the type.")
    if path.is_dir() and not is_hf_tokenizer(path):
        raise DataError(f"tokenizer directory {str(path)!r} has no {HF_TOKENIZER_FILE}; pass a sentencepiece .model "
                        f"file or a directory holding a Hugging Face tokenizer.json.")
    return HFTokenizer(path) if is_hf_tokenizer(path) else NeonTokenizer(path)


def tokenizer_vocab_size(model_path: str | Path) -> int:
    """The vocabulary size of a tokenizer (DataError naming the file if unusable)."""
    return load_tokenizer(model_path).vocab_size
