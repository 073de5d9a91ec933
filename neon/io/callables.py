"""`callable`: any importable Python function as a FlamingMoE IO function (the "API" case).

    "name=add,kind=callable,source=my_tools.arith:add,returns=tokens,width=4[,timeout=2,retries=1]"

The entry names `module:function`. Once per forward pass and bank (never per token), the function
receives the context rows of all tokens routed to it on this rank,

    fn(context: torch.LongTensor [T, 2 + W]) -> [T, width]
    context[t] = (position, sequence, id_{t-W+1}, ..., id_t)      (-1 before the sequence start)

so it sees the routed token and earlier tokens of the same sequence only, never later ones. It
returns token ids (int, -1 for none; embedded by the function's own embedding, since the model's
input embedding lives on the first pipeline stage only) or float vectors (`returns=vectors`), as
a tensor or numpy array. Under expert parallelism it runs on the rank that holds it, on the tokens
routed there. The result is not differentiated; the embedding and W_out are learned:

    f(x_t, c_t) = W_out concat_m Emb[fn(c)_t,m]     or     W_out fn(c)_t

A function that leaves the process (a service, a database) gets `timeout` seconds per call (0:
no limit) and `retries` further attempts after a call that raised or timed out. A call that still
fails raises IOFunctionError naming the function and the call (the Trainer adds the step): the
job ends with exit status 2, it never waits on a hung call (the call runs in a daemon thread that
is left behind).
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from neon.errors import IOFunctionError, IOSourceError
from neon.io.base import IOFunction, IOKind, IOSettings, IOSpec


@dataclass(frozen=True)
class CallableOptions:
    returns: Literal["tokens", "vectors"] = "tokens"
    width: int = 1
    embed_dim: int = 0
    timeout: float = 0.0
    retries: int = 0


def resolve_callable(spec: IOSpec):
    module, sep, name = spec.source.partition(":")
    if not sep or not module or not name:
        raise IOSourceError(f"{spec.where()}: source must be 'module:function'. Fix: e.g. "
                            "source=my_tools.arith:add (an importable module and a function in it).")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's source
        raise IOSourceError(f"{spec.where()}: cannot import module {module!r} ({type(e).__name__}: {e}). Fix: put "
                            "it on PYTHONPATH or correct the name.") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise IOSourceError(f"{spec.where()}: module {module!r} has no callable {name!r}. Fix: name a function "
                            "defined in that module.")
    return fn


class CallTimedOut(Exception):
    pass


def call_with_timeout(fn, arg, timeout: float, name: str):
    """fn(arg), or CallTimedOut after `timeout` seconds (0: wait as long as it takes). A call that
    times out keeps running in its daemon thread, which never holds the process at exit."""
    if not timeout:
        return fn(arg)
    result: dict = {}

    def run():
        try:
            result["value"] = fn(arg)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result["error"] = e

    thread = threading.Thread(target=run, name=f"neon-io-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise CallTimedOut(f"no answer within timeout={timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


class CallableFunction(IOFunction):
    def __init__(self, spec: IOSpec, settings: IOSettings):
        super().__init__(spec, settings)
        o = spec.options
        self.fn = resolve_callable(spec)
        self.calls = 0  # forward-pass calls made (named in errors)
        if o.returns == "tokens":
            self.embed_dim = o.embed_dim or settings.hidden_size
            self.embedding = torch.nn.Embedding(settings.vocab_size, self.embed_dim)
            torch.nn.init.normal_(self.embedding.weight, std=settings.init_std)
            self.build_out(o.width * self.embed_dim)
        else:
            self.build_out(o.width)

    def call(self, context: torch.Tensor) -> torch.Tensor:
        """The user's function on [T, C] context rows, with the time limit and retries; its result
        checked: [T, width]."""
        self.calls += 1
        o = self.spec.options
        where = f"{self.spec.where()} on its call {self.calls} (one call per forward pass)"
        rows = context.detach().cpu()
        for attempt in range(1, o.retries + 2):
            try:
                out = call_with_timeout(self.fn, rows, o.timeout, self.spec.name)
                break
            except Exception as e:  # noqa: BLE001 - retried, then the run stops naming the function
                if attempt > o.retries:
                    tried = f" (after {attempt} attempts)" if attempt > 1 else ""
                    raise IOFunctionError(f"{where} {'timed out' if isinstance(e, CallTimedOut) else 'raised'}"
                                          f"{tried}: {type(e).__name__}: {e}. Fix: make the source answer, or raise "
                                          "timeout= / retries= in its entry.") from e
        out = torch.as_tensor(np.asarray(out) if not torch.is_tensor(out) else out)
        want = (context.shape[0], o.width)
        if tuple(out.shape) != want:
            raise IOFunctionError(f"{where} returned shape {tuple(out.shape)}, expected {list(want)} (routed tokens, "
                                  f"width={o.width}). Fix: return one row per context row.")
        tokens = o.returns == "tokens"
        if tokens and (out.is_floating_point() or out.is_complex()):
            raise IOFunctionError(f"{where} returned {out.dtype}, expected integer token ids. Fix: return ids, or "
                                  "set returns=vectors.")
        if tokens and out.numel() and int(out.max()) >= self.settings.vocab_size:
            raise IOFunctionError(f"{where} returned id {int(out.max())} >= vocab_size {self.settings.vocab_size}. "
                                  "Fix: return ids of the model's vocabulary.")
        return out

    def read(self, x, context, extra):
        with torch.no_grad():
            out = self.call(context).to(x.device)
        if self.spec.options.returns == "vectors":
            return out.float()
        out = out.long()
        emb = self.embedding(out.clamp(min=0)) * (out >= 0).unsqueeze(-1)  # [T, width, e]
        return emb.flatten(1)


class CallableKind(IOKind):
    name = "callable"
    options = CallableOptions
    run_options = ("timeout", "retries")

    def validate(self, spec):
        o = spec.options
        if o.width < 1:
            raise IOSourceError(f"{spec.where()}: width={o.width} must be >= 1. Fix: the ids (or vector entries) "
                                "the function returns per token.")
        if o.embed_dim < 0 or o.timeout < 0 or o.retries < 0:
            raise IOSourceError(f"{spec.where()}: embed_dim, timeout and retries must be >= 0.")

    def check_source(self, spec, settings):
        resolve_callable(spec)

    def build(self, spec, settings):
        return CallableFunction(spec, settings)

    def macs(self, spec, settings):
        """V * d: W_out over the returned value (width ids x their embedding, or width numbers);
        the call itself is not a matmul."""
        o, d = spec.options, settings.hidden_size
        return (o.width * (o.embed_dim or d) if o.returns == "tokens" else o.width) * d
