"""IO functions: FlamingMoE bank entries that read from outside the model.

An IO function is routed like a learned function (same router, same dispatcher, same weights
p), but besides the routed tokens' hidden states x [T, d] it receives their context c [T, C]:

    c[t] = (position, sequence, id_{t-W+1}, ..., id_{t-1}, id_t)     (int64, W = context window)

ids before the sequence start are -1, so a row holds only the token itself and earlier tokens of
its own sequence. The context is built once per forward pass from the input ids
(`token_context`), travels with the tokens through megatron's dispatcher
(megatron_plugins/context_dispatch.py) and reaches the layers as a forward argument.

    f(x, c) = W_out read(q(x, c), c)           q: query (learned W_q x, or frozen from c)
                                               read: the external part (may be non-differentiable)
                                               W_out: learned projection to the residual

Config: `flaming_io_functions`, one string per function, comma-separated key=value pairs:

    "name=facts,kind=store,source=/data/facts_store,query=context,topk=4"
    "name=add,kind=callable,source=my_tools.arith:add,returns=tokens,width=4"

    "name=anchor,kind=model,source=/models/small_lm,layer=-1"      (neon/flaming/frozen_model.py)

    "name=facts,kind=store,source=/data/facts_store,query=context,bank=global"

`name` and `kind` ('store' | 'callable' | 'model') and `source` are required. `bank` says which
bank the function sits in: 'layer' (the default) joins the per-layer bank after its
`flaming_layer_functions` learned ones (bank index F, F+1, ...), one function per layer;
'global' joins the global bank after its `flaming_global_functions` learned ones, one function
shared by every layer (each layer routes to it with its own router).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from neon.errors import IOSourceError

IO_KINDS = ("store", "callable", "model")
BANKS = ("global", "layer")
QUERY_KINDS = ("context", "hidden")
RETURN_KINDS = ("tokens", "vectors")
CONTEXT_FIXED_COLUMNS = 2  # position, sequence; then the W ids


@dataclasses.dataclass(frozen=True)
class IOFunctionSpec:
    name: str
    kind: str
    source: str
    query: str = "context"   # store: 'context' (frozen encoder of the last n ids) or 'hidden'
    topk: int = 4            # store: entries read per routed token
    temperature: float = 1.0  # store: softmax temperature of the similarity weights
    returns: str = "tokens"  # callable: 'tokens' (ids, own embedding) or 'vectors'
    width: int = 1           # callable: ids (or vector entries) it returns per token
    embed_dim: int = 0       # own embedding width of returned/stored tokens (0: hidden size)
    layer: int = -1          # model: the frozen model's hidden state (0 = embeddings, -1 = last)
    tokenizer: str = ""      # model: Neon's sentencepiece model, to re-tokenize for another vocabulary
    bank: str = "layer"      # 'layer': one function per layer; 'global': one shared by all layers

    def where(self) -> str:
        return f"IO function {self.name!r} ({self.kind} {self.source!r})"


_INT_FIELDS = {"topk", "width", "embed_dim", "layer"}
_FLOAT_FIELDS = {"temperature"}


def parse_spec(text: str) -> IOFunctionSpec:
    """'name=facts,kind=store,source=/path,...' -> IOFunctionSpec (errors name the entry)."""
    fields = {f.name for f in dataclasses.fields(IOFunctionSpec)}
    values = {}
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise IOSourceError(
                f"flaming_io_functions entry {text!r}: {part!r} is not a key=value pair with a "
                f"known key. Fix: use keys from {sorted(fields)}, e.g. "
                "'name=facts,kind=store,source=/data/facts_store'.")
        values[key] = value.strip()
    for key in ("name", "kind", "source"):
        if not values.get(key):
            raise IOSourceError(f"flaming_io_functions entry {text!r} has no {key}. Fix: add "
                                f"'{key}=...' (every IO function needs name, kind and source).")
    try:
        for key in _INT_FIELDS & values.keys():
            values[key] = int(values[key])
        for key in _FLOAT_FIELDS & values.keys():
            values[key] = float(values[key])
    except ValueError as e:
        raise IOSourceError(f"flaming_io_functions entry {text!r}: {e}. Fix: give a number.") from None
    spec = IOFunctionSpec(**values)
    _check_choices(spec)
    return spec


def _check_choices(spec: IOFunctionSpec) -> None:
    for key, choices in (("kind", IO_KINDS), ("query", QUERY_KINDS), ("returns", RETURN_KINDS),
                         ("bank", BANKS)):
        if getattr(spec, key) not in choices:
            raise IOSourceError(f"{spec.where()}: {key}={getattr(spec, key)!r} is not one of "
                                f"{choices}. Fix: use one of them.")
    for key in ("topk", "width"):
        if getattr(spec, key) < 1:
            raise IOSourceError(f"{spec.where()}: {key}={getattr(spec, key)} must be >= 1.")
    if spec.temperature <= 0:
        raise IOSourceError(f"{spec.where()}: temperature={spec.temperature} must be > 0.")


def io_specs(config, bank: Optional[str] = None) -> list[IOFunctionSpec]:
    """The configured IO functions (all, or those of `bank`: 'global' | 'layer'), in config order."""
    specs = [parse_spec(t) for t in (getattr(config, "flaming_io_functions", None) or ())]
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise IOSourceError(f"flaming_io_functions names {sorted(dup)} more than once. Fix: give "
                            "each IO function its own name.")
    return [s for s in specs if bank is None or s.bank == bank]


def canonical_entries(entries) -> list[dict]:
    """Each entry as its parsed fields (defaults filled in, so 'bank=layer' equals no bank key),
    without `source`: what the architecture check compares (neon/training/model_match.py)."""
    out = []
    for spec in (parse_spec(e) for e in entries or ()):
        fields = dataclasses.asdict(spec)
        fields.pop("source")
        out.append(fields)
    return out


# --- the token context ---------------------------------------------------------------------------


def token_context(input_ids: torch.Tensor, window: int,
                  position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """input_ids [b, s] -> context [s, b, 2 + W] int64 (megatron's [seq, batch] layout).

    Row (t, j) = (position, sequence j, ids[j, t-W+1 .. t]); -1 before the sequence start."""
    b, s = input_ids.shape
    ids = input_ids.long()
    padded = torch.cat([ids.new_full((b, window - 1), -1), ids], dim=1)  # [b, s + W - 1]
    windows = padded.unfold(1, window, 1)  # [b, s, W]: ids t-W+1 .. t
    pos = (position_ids.long() if position_ids is not None
           else torch.arange(s, device=ids.device).expand(b, s))
    seq = torch.arange(b, device=ids.device).unsqueeze(1).expand(b, s)
    ctx = torch.cat([pos.unsqueeze(-1), seq.unsqueeze(-1), windows], dim=-1)  # [b, s, 2 + W]
    return ctx.transpose(0, 1).contiguous()


def base_context(context: torch.Tensor, window: int) -> torch.Tensor:
    """[T, C] -> [T, 2 + W]: the context without the packed frozen-model states that `model`
    functions append (neon/flaming/frozen_model.py)."""
    return context[:, :CONTEXT_FIXED_COLUMNS + window]


def context_ids(context: torch.Tensor) -> torch.Tensor:
    """[T, 2 + W] -> the ids window [T, W] (last column: the routed token itself)."""
    return context[:, CONTEXT_FIXED_COLUMNS:]


# --- the function interface ----------------------------------------------------------------------


class IOFunction(MegatronModule):
    """Base of an IO function: forward(x [T, d], per_token_scale p [T], context [T, C]) ->
    (p * W_out read(x, c) [T, d], None). Subclasses define `read(x, context) -> [T, value_dim]`
    (their learned query projection included) and set `value_dim` before calling `build_out`."""

    is_io = True
    # matrices in d_model space (for nGPT): W_out [d, value_dim] by its columns, a learned query
    # W_q [K, d] by its rows; own value embeddings are not in d_model space and stay as they are
    unit_sphere_dims = {"out_proj.weight": 0, "query_proj.weight": 1}

    def __init__(self, config, spec: IOFunctionSpec):
        super().__init__(config=config)
        self.spec = spec

    def build_out(self, value_dim: int) -> None:
        self.value_dim = value_dim
        self.out_proj = torch.nn.Linear(value_dim, self.config.hidden_size, bias=False)
        torch.nn.init.normal_(self.out_proj.weight, std=self.config.init_method_std)

    def read(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def own_context(self, context: torch.Tensor) -> torch.Tensor:
        """The dispatched context [T, C] -> the columns this function reads: the token context
        [T, 2 + W] (functions with columns appended after it override this)."""
        return base_context(context, self.config.flaming_io_context_window)

    def forward(self, hidden_states, per_token_scale=None, context=None, **_):
        if context is None:
            raise RuntimeError(f"{self.spec.where()} got no token context: run the model through "
                               "neon.model.build_model's forward (input ids give the context)")
        if hidden_states.shape[0] == 0:  # no token routed here in this micro-batch
            values = hidden_states.new_zeros(0, self.value_dim)
        else:
            values = self.read(hidden_states, context)  # [T, value_dim]
        out = self.out_proj(values.to(self.out_proj.weight.dtype))  # [T, d]
        if per_token_scale is not None:
            out = out * per_token_scale.unsqueeze(-1)
        return out.to(hidden_states.dtype), None

    def source_identity(self) -> dict:
        """What a checkpoint records about the external source (not its contents)."""
        return {"name": self.spec.name, "kind": self.spec.kind, "source": self.spec.source}

    # the source identity travels in the state dict (`<prefix>_extra_state`): recorded, not copied
    def get_extra_state(self) -> dict:
        return {"io_source": self.source_identity()}

    def set_extra_state(self, state) -> None:
        if isinstance(state, dict) and "io_source" in state:
            self.check_source(state["io_source"])

    def check_source(self, recorded: dict) -> None:
        """At load: the source must be the recorded one (stores override this with a content check)."""
        if recorded.get("source") != self.spec.source and not self.config.flaming_io_store_swap:
            raise IOSourceError(f"{self.spec.where()}: the checkpoint was trained with source "
                                f"{recorded.get('source')!r}. Fix: configure that source, or set "
                                "flaming_io_store_swap=True to use this one.")


def build_io_function(config, spec: IOFunctionSpec) -> IOFunction:
    if spec.kind == "store":
        from neon.flaming.store import StoreFunction

        return StoreFunction(config, spec)
    if spec.kind == "model":
        from neon.flaming.frozen_model import ModelFunction

        return ModelFunction(config, spec)
    from neon.flaming.callables import CallableFunction

    return CallableFunction(config, spec)


def check_io_sources(config) -> None:
    """Open every IO function's source (store files, callable import) now, so a wrong or missing
    source fails at start with an error naming it."""
    for spec in io_specs(config):
        if spec.kind == "store":
            from neon.flaming.store import open_store

            open_store(spec.source, where=spec.where())
        elif spec.kind == "model":
            from neon.flaming.frozen_model import frozen_config, retokenizer

            frozen_config(spec)
            retokenizer(spec, config)
        else:
            from neon.flaming.callables import resolve_callable

            resolve_callable(spec)
