"""NeonTokenizer: the sentencepiece model the data pipeline and the model share.

Special ids of models trained by tools/train_tokenizer.py (Mistral's layout plus a pad):
unk=0, bos=1, eos=2, pad=3. The end-of-document token (``eod``) is ``eos``, as in Megatron-LM's
SentencePiece tokenizers, so .bin/.idx files from either tool agree. Models from elsewhere work
too: ids they do not define are -1.
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


def tokenizer_vocab_size(model_path: str | Path) -> int:
    """The number of pieces of a sentencepiece model file (DataError naming the file if unusable)."""
    return NeonTokenizer(model_path).vocab_size
