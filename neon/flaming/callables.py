"""`callable`: any importable Python function as a FlamingMoE IO function (the "API" case).

The config names `module:function`. Once per micro-batch and bank (never per token), the
function receives the context rows of all tokens routed to it on this rank,

    fn(context: torch.LongTensor [T, 2 + W]) -> [T, width]
    context[t] = (position, sequence, id_{t-W+1}, ..., id_t)      (-1 before the sequence start)

so it sees the routed token and earlier tokens of the same sequence only, never later ones.
It returns token ids (int, -1 for none; embedded by the function's own embedding, since the
model's input embedding lives on the first pipeline stage only) or float vectors
(`returns=vectors`), as a tensor or numpy array. Under expert parallelism it runs on the rank
that holds it, on the tokens routed there. The result is not differentiated; the embedding
and W_out are learned:

    f(x_t, c_t) = W_out concat_m Emb[fn(c)_t,m]     or     W_out fn(c)_t
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from neon.errors import IOFunctionError, IOSourceError
from neon.flaming.io import IOFunction, IOFunctionSpec


def resolve_callable(spec: IOFunctionSpec):
    module, sep, name = spec.source.partition(":")
    if not sep or not module or not name:
        raise IOSourceError(f"{spec.where()}: source must be 'module:function'. Fix: e.g. "
                            "source=my_tools.arith:add (an importable module and a function in it).")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's source
        raise IOSourceError(f"{spec.where()}: cannot import module {module!r} ({type(e).__name__}: "
                            f"{e}). Fix: put it on PYTHONPATH or correct the name.") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise IOSourceError(f"{spec.where()}: module {module!r} has no callable {name!r}. Fix: name a "
                            "function defined in that module.")
    return fn


class CallableFunction(IOFunction):
    def __init__(self, config, spec: IOFunctionSpec):
        super().__init__(config, spec)
        self.fn = resolve_callable(spec)
        self.calls = 0  # micro-batch calls made (named in errors)
        if spec.returns == "tokens":
            self.embed_dim = spec.embed_dim or config.hidden_size
            self.embedding = torch.nn.Embedding(config.vocab_size, self.embed_dim)
            torch.nn.init.normal_(self.embedding.weight, std=config.init_method_std)
            self.build_out(spec.width * self.embed_dim)
        else:
            self.build_out(spec.width)

    def call(self, context: torch.Tensor) -> torch.Tensor:
        """The user's function on [T, C] context rows, its result checked: [T, width]."""
        self.calls += 1
        where = f"{self.spec.where()} on its call {self.calls} (one call per micro-batch)"
        try:
            out = self.fn(context.detach().cpu())
        except Exception as e:  # noqa: BLE001 - stop the run, naming the function
            raise IOFunctionError(f"{where} raised {type(e).__name__}: {e}") from e
        out = torch.as_tensor(np.asarray(out) if not torch.is_tensor(out) else out)
        want = (context.shape[0], self.spec.width)
        if tuple(out.shape) != want:
            raise IOFunctionError(f"{where} returned shape {tuple(out.shape)}, expected {list(want)} "
                                  f"(routed tokens, width={self.spec.width}). Fix: return one row per "
                                  "context row.")
        tokens = self.spec.returns == "tokens"
        if tokens and (out.is_floating_point() or out.is_complex()):
            raise IOFunctionError(f"{where} returned {out.dtype}, expected integer token ids. "
                                  "Fix: return ids, or set returns=vectors.")
        if tokens and out.numel() and int(out.max()) >= self.config.vocab_size:
            raise IOFunctionError(f"{where} returned id {int(out.max())} >= vocab_size "
                                  f"{self.config.vocab_size}. Fix: return ids of the model's vocabulary.")
        return out

    def read(self, hidden_states, context):
        with torch.no_grad():
            out = self.call(context).to(hidden_states.device)
        if self.spec.returns == "vectors":
            return out.float()
        out = out.long()
        emb = self.embedding(out.clamp(min=0)) * (out >= 0).unsqueeze(-1)  # [T, width, e]
        return emb.flatten(1)
