"""NeonTokenizer (Hugging Face side): the sentencepiece model Neon trained with, encoding exactly
as sentencepiece does.

transformers' LlamaTokenizer conversion of a sentencepiece BPE model does not reproduce
sentencepiece's ids on runs of whitespace ("  leading", indented code); this class calls
`sp_model.encode` directly, so `AutoTokenizer.from_pretrained(dir, trust_remote_code=True)` gives
the ids the model was trained on. Like configuration_neon.py it is copied next to an exported
model and imports nothing from the neon package.
"""

from __future__ import annotations

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class NeonTokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                 add_bos_token=False, add_eos_token=False, **kwargs):
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        super().__init__(vocab_file=vocab_file, bos_token=bos_token, eos_token=eos_token, unk_token=unk_token,
                         pad_token=pad_token, **{**kwargs, "legacy": True})

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def convert_tokens_to_string(self, tokens):
        """sentencepiece's text for runs of pieces; special tokens (which sentencepiece decodes to
        nothing) as their own text, as transformers' LlamaTokenizer does."""
        out, run = [], []
        for token in tokens:
            if token in self.all_special_tokens:
                out += [self.sp_model.decode_pieces(run), token]
                run = []
            else:
                run.append(token)
        return "".join(out + [self.sp_model.decode_pieces(run)])

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if self.add_eos_token and self.eos_token_id is not None else []
        out = bos + token_ids_0 + eos
        return out if token_ids_1 is None else out + bos + token_ids_1 + eos


NeonTokenizer.register_for_auto_class("AutoTokenizer")

__all__ = ["NeonTokenizer"]
