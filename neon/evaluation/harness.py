"""NeonLM: lm-evaluation-harness's model interface over a Neon model.

lm-eval asks a model three things (lm_eval.api.model.LM): `loglikelihood` (the log-probability
of a continuation after a context, and whether greedy decoding would produce it),
`loglikelihood_rolling` (a whole text's log-probability, in windows of the model's length) and
`generate_until` (greedy generation up to a stop string). NeonLM answers them as lm-eval's own
`hf` model (HFLM) does for a causal model, so the same task on a Neon checkpoint and on its
Hugging Face export gives the same numbers up to float rounding:

- text is encoded with the training tokenizer, no special tokens added (HFLM's default);
- an empty context becomes the bos token, or eod where the tokenizer has no bos (HFLM's
  prefix_token_id);
- context + continuation longer than `max_length` + 1 is cut from the left, and the model reads
  (context + continuation)[:-1]; log-softmax over the model's whole (padded) vocabulary;
- rolling windows are lm_eval.utils.get_rolling_token_windows with context length 1;
- generation is greedy, at most `max_gen_toks` tokens (256, HFLM's) after the context's last
  max_length - max_gen_toks tokens, cut at the first stop string.

`logits` is any callable tokens [b, s] -> float32 logits [b, s, vocab]: forward.ModelLogits over
the model chunks of a run (every rank calls it with the same requests), or a plain model.
Requests are batched `batch_size` at a time, right-padded (causal attention never reads the
padding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm


class NeonLM(TemplateLM):
    def __init__(self, logits: Callable[[torch.Tensor], torch.Tensor], tokenizer, *, max_length: int,
                 batch_size: int = 8, max_gen_toks: int = 256, show_progress: bool = True):
        super().__init__()
        self.logits, self.neon_tokenizer = logits, tokenizer
        self.max_length, self.batch_size, self.max_gen_toks = max_length, batch_size, max_gen_toks
        self.show_progress = show_progress

    # --- tokens ---------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.neon_tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        bos = self.neon_tokenizer.bos
        return bos if bos is not None and bos >= 0 else self.neon_tokenizer.eod

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return list(self.neon_tokenizer.encode(string))

    def tok_decode(self, ids) -> str:
        return self.neon_tokenizer.decode(ids)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.neon_tokenizer, "model_path", "neon"))

    # --- scoring --------------------------------------------------------------------------------

    def _batch_logprobs(self, inputs: list[list[int]]) -> torch.Tensor:
        """Right-padded [b, longest] inputs -> log-softmax [b, longest, vocab]."""
        longest = max(len(x) for x in inputs)
        pad = self.neon_tokenizer.eod
        tokens = torch.tensor([x + [pad] * (longest - len(x)) for x in inputs], dtype=torch.long)
        return F.log_softmax(self.logits(tokens).float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or not self.show_progress)
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in batch]
            logprobs = self._batch_logprobs(inputs)
            for (_, _, cont), inp, lp in zip(batch, inputs, logprobs):
                picked = lp[len(inp) - len(cont):len(inp)]  # the positions that predict the continuation
                target = torch.tensor(cont, dtype=torch.long)
                greedy = bool((picked.argmax(dim=-1) == target).all())
                results.append((float(picked.gather(1, target[:, None]).sum()), greedy))
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in tqdm([r.args for r in requests], desc="loglikelihood_rolling",
                              disable=disable_tqdm or not self.show_progress):
            windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            out.append(sum(score for score, _ in scores))
        return out

    # --- generation -----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="generate_until",
                                        disable=disable_tqdm or not self.show_progress):
            until = gen_kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ids, new = self.tok_encode(context)[-(self.max_length - max_new):], []  # room for max_new tokens
            for _ in range(max_new):
                next_id = int(self._batch_logprobs([ids + new])[0, -1].argmax())
                if next_id == self.eot_token_id:
                    break
                new.append(next_id)
                text = self.tok_decode(new)
                if any(stop in text for stop in until):
                    break
            text = self.tok_decode(new)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out
