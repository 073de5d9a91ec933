"""The IO-kind contract: how a FlamingMoE IO function is specified, what it reads, and the token
context it reads from. Shared by training (neon/flaming/) and the Hugging Face export, which copies
this package's files next to modeling_neon.py (they import only torch, numpy, the standard
library, neon.errors and neon.io; the export makes those imports relative).

An IO function is a bank entry routed like a learned function that also receives, for each of its
tokens, a row of the token context:

    c_t = (position_t, sequence_t, id_{t-W+1}, ..., id_t | extra columns)       int64
    f(x_t, c_t) = W_out read(x_t, c_t)

ids before the sequence start are -1, so a row holds only the token itself and earlier tokens of
its sequence. The first 2 + W columns are every function's; a kind whose functions need more
(a frozen model's states, a search done once for every layer) adds columns through a
`ContextProvider`, and the `ContextLayout` built once per model names each function's slice.

An IO function is one config entry, `name=...,kind=...,source=...[,bank=layer|global][,key=value]`:
the common keys are `IOSpec`'s, every other key is an option of its kind (a typed dataclass,
`IOKind.options`). A kind is one module with an `IOKind` subclass, listed in neon/io/kinds.py.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from neon.errors import IOSourceError

CONTEXT_FIXED_COLUMNS = 2  # position, sequence; then the W ids
BANKS = ("layer", "global")


# --- what an IO function knows of its model -----------------------------------------------------


@dataclass(frozen=True)
class IOSettings:
    """The model-side settings IO functions are built with (from NeonConfig in training, from
    NeonHFConfig in the export)."""

    hidden_size: int
    vocab_size: int          # the model's (padded) vocabulary: ids of the context lie below it
    context_window: int      # W: ids per context row
    init_std: float = 0.02
    source_swap: bool = False     # accept other sources than the recorded ones (same shapes)
    reuse_search: bool = True     # a search every layer would repeat runs once per forward


# --- the entry: common keys and the kind's options -------------------------------------------------


@dataclass(frozen=True)
class IOSpec:
    name: str
    kind: str
    source: str
    bank: str = "layer"  # 'layer': one function per layer; 'global': one shared by every layer
    options: Any = None  # the kind's options (its `options` dataclass)

    def where(self) -> str:
        return f"IO function {self.name!r} ({self.kind} {self.source!r})"


COMMON_KEYS = ("name", "kind", "source", "bank")


def _value(spec_text: str, key: str, raw: str, tp):
    """One option's text as its annotated type (int, float, bool, str, Literal, Optional)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        tp = next(a for a in args if a is not type(None))
        if raw in ("", "none", "None", "null"):
            return None
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if raw not in args:
            raise IOSourceError(f"flaming_io_functions entry {spec_text!r}: {key}={raw!r} is not one of "
                                f"{list(args)}. Fix: use one of them.")
        return raw
    try:
        if tp is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{raw!r} is not a boolean")
            return raw.lower() in ("true", "1", "yes")
        return tp(raw)
    except ValueError as e:
        raise IOSourceError(f"flaming_io_functions entry {spec_text!r}: {key}={raw!r}: {e}. Fix: give a "
                            f"{getattr(tp, '__name__', tp)}.") from None


def parse_options(kind: IOKind, spec_text: str, values: dict[str, str]):
    """The kind's options dataclass from the entry's key=value texts (unknown keys name the fix)."""
    hints = typing.get_type_hints(kind.options)
    known = {f.name for f in dataclasses.fields(kind.options)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise IOSourceError(f"flaming_io_functions entry {spec_text!r}: {unknown[0]!r} is not an option of "
                            f"kind {kind.name!r}. Fix: use the keys {list(COMMON_KEYS)} and the {kind.name} "
                            f"options {sorted(known)}.")
    options = kind.options(**{k: _value(spec_text, k, v, hints[k]) for k, v in values.items()})
    return options


def parse_spec(text: str) -> IOSpec:
    """'name=facts,kind=store,source=/path,topk=4' -> IOSpec (errors name the entry and the fix)."""
    values: dict[str, str] = {}
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise IOSourceError(f"flaming_io_functions entry {text!r}: {part!r} is not a key=value pair. Fix: "
                                "e.g. 'name=facts,kind=store,source=/data/facts_store'.")
        values[key.strip()] = value.strip()
    for key in ("name", "kind", "source"):
        if not values.get(key):
            raise IOSourceError(f"flaming_io_functions entry {text!r} has no {key}. Fix: add '{key}=...' (every "
                                "IO function needs name, kind and source).")
    name = values["name"]
    if not name.isidentifier() or hasattr(torch.nn.ModuleDict, name):  # it names a module of the model
        raise IOSourceError(f"flaming_io_functions entry {text!r}: name={name!r} cannot name a module (letters, "
                            f"digits and '_', not starting with a digit, and not an attribute of torch.nn.Module "
                            f"such as 'train' or 'forward'). Fix: e.g. name=datastore.")
    if values.get("bank", "layer") not in BANKS:
        raise IOSourceError(f"flaming_io_functions entry {text!r}: bank={values['bank']!r} is not one of "
                            f"{list(BANKS)}. Fix: use one of them.")
    kind = kind_of(values["kind"], where=f"flaming_io_functions entry {text!r}")
    common = {k: values.pop(k) for k in COMMON_KEYS if k in values}
    spec = IOSpec(**common, options=parse_options(kind, text, values))
    kind.validate(spec)
    return spec


def io_specs(entries, bank: Optional[str] = None) -> list[IOSpec]:
    """The IO functions of `entries` (all, or those of `bank`: 'global' | 'layer'), in order."""
    specs = [parse_spec(t) for t in (entries or ())]
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise IOSourceError(f"flaming_io_functions names {sorted(dup)} more than once. Fix: give each IO function "
                            "its own name.")
    return [s for s in specs if bank is None or s.bank == bank]


def canonical(spec: IOSpec) -> dict:
    """What the architecture check compares of an entry: its fields and options (defaults filled
    in) without `source` and without the options that only say how it runs (`run_options`)."""
    run = set(kind_of(spec.kind).run_options)
    options = {k: v for k, v in dataclasses.asdict(spec.options).items() if k not in run}
    return {"name": spec.name, "kind": spec.kind, "bank": spec.bank, **options}


# --- the token context ------------------------------------------------------------------------------


def token_context(ids: torch.Tensor, window: int, positions: Optional[torch.Tensor] = None,
                  history: Optional[torch.Tensor] = None, documents: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ids [b, s] (-1: padding) -> context [b, s, 2 + W]: (position, sequence row, id_{t-W+1} .. id_t).

    history [b, W - 1]: the ids before these (cached generation; default -1: the sequence starts
    here); positions [b, s]: the tokens' position ids (default 0 .. s - 1); documents [b, s]: each
    token's document number (document masks): ids of an earlier document are -1 in the window."""
    b, s = ids.shape
    ids = ids.long()
    if history is None:
        history = ids.new_full((b, window - 1), -1)
    windows = torch.cat([history, ids], dim=1).unfold(1, window, 1)  # [b, s, W]: ids t-W+1 .. t
    if documents is not None:
        docs = documents.long()
        doc_windows = torch.cat([docs[:, :1].expand(b, window - 1), docs], dim=1).unfold(1, window, 1)
        windows = windows.masked_fill(doc_windows != docs[..., None], -1)
    pos = positions.long().expand(b, s) if positions is not None else torch.arange(s, device=ids.device).expand(b, s)
    seq = torch.arange(b, device=ids.device)[:, None].expand(b, s)
    return torch.cat([pos[..., None], seq[..., None], windows], dim=-1)


def context_ids(context: torch.Tensor, window: int) -> torch.Tensor:
    """[T, C] -> the ids window [T, W] (last column: the routed token itself)."""
    return context[:, CONTEXT_FIXED_COLUMNS:CONTEXT_FIXED_COLUMNS + window]


class ContextProvider:
    """Extra context columns computed once per forward pass for some IO functions (a frozen
    model's states, a search every layer would repeat): `columns` {function name: width};
    `compute` -> {function name: int64 [b, s, width]}."""

    columns: dict[str, int] = {}

    def compute(self, input_ids: torch.Tensor, context: torch.Tensor, *, dtype: torch.dtype, attention_mask=None,
                cache: Optional[IOCacheState] = None, documents: Optional[torch.Tensor] = None
                ) -> dict[str, torch.Tensor]:
        """input_ids [b, s] (the model's ids), context [b, s, 2 + W]; dtype: the model's hidden
        states'; `cache`: generation's state (None in training), where a provider may keep its own
        (`cache.providers`); documents [b, s]: document masks (no token's columns may depend on an
        earlier document's tokens; the ids window already has them masked)."""
        raise NotImplementedError

    def report(self, step_time_s: float) -> dict[str, float]:
        """Values for the training log since the last report (e.g. a frozen model's share of the step)."""
        return {}


class IOCacheState:
    """What cached generation keeps besides the attention keys and values: the last W - 1 ids of
    every row (the context window) and each provider's own state (a frozen model's KV cache)."""

    def __init__(self, history: torch.Tensor):
        self.history = history  # [b, W - 1]
        self.providers: dict = {}

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Rows follow beam search's choice."""
        self.history = self.history[beam_idx.to(self.history.device)]
        for state in self.providers.values():
            if hasattr(state, "reorder_cache"):
                state.reorder_cache(beam_idx)


class ContextLayout:
    """The column slices of the token context of a model: [0, 2 + W) every function's, then the
    columns of each kind's providers, in registry order (`IOKind.context_columns`)."""

    def __init__(self, specs: list[IOSpec], settings: IOSettings):
        self.window = settings.context_window
        self.slices: dict[str, tuple[int, int]] = {}
        start = CONTEXT_FIXED_COLUMNS + self.window
        for kind in KINDS.values():
            for name, width in kind.context_columns(specs, settings).items():
                self.slices[name] = (start, width)
                start += width
        self.width = start

    def attach(self, functions) -> None:
        """Tell each IO function where its own columns are."""
        for fn in functions:
            fn.extra_columns = self.slices.get(fn.spec.name)


def context_providers(specs: list[IOSpec], settings: IOSettings) -> list[ContextProvider]:
    """The providers of a model's extra context columns, in the layout's order."""
    return [p for kind in KINDS.values() for p in kind.providers(specs, settings)]


def build_context(layout: ContextLayout, providers: list[ContextProvider], input_ids: torch.Tensor,
                  positions: Optional[torch.Tensor] = None, *, dtype: torch.dtype = torch.float32,
                  attention_mask=None, cache: Optional[IOCacheState] = None,
                  documents: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The full context [b, s, layout.width] of input ids [b, s] (dtype: the model's hidden
    states'; with a cache: the ids before them come from it, and it keeps these; documents [b, s]:
    document masks, which the ids window and every provider honour)."""
    ids = input_ids.long()
    if attention_mask is not None:  # padding is not part of any sequence
        ids = ids.masked_fill(attention_mask[:, -ids.shape[1]:] == 0, -1)
    history = cache.history if cache is not None else None
    context = token_context(ids, layout.window, positions, history, documents)
    if cache is not None:
        joined = torch.cat([cache.history, ids], dim=1)
        cache.history = joined[:, joined.shape[1] - cache.history.shape[1]:]
    extra = []
    for provider in providers:
        cols = provider.compute(input_ids, context, dtype=dtype, attention_mask=attention_mask, cache=cache,
                                documents=documents)
        for name, width in provider.columns.items():
            assert layout.slices[name] == (context.shape[-1] + sum(e.shape[-1] for e in extra), width), name
            extra.append(cols[name].to(context.device, torch.long))
    return torch.cat([context, *extra], dim=-1) if extra else context


# --- the function and the kind ---------------------------------------------------------------------


class AttachLoss(torch.autograd.Function):
    """An IO function's own training loss, joined to the backward pass: returns `output`
    unchanged, and in the backward pass `loss` receives the gradient `scale` (megatron's
    MoEAuxLossAutoScaler, without megatron: the exported code carries this module). The training
    loop sets `scale` before each step to the main loss's gradient scale over its micro-batches
    (neon/flaming/losses.py)."""

    scale = 1.0

    @staticmethod
    def forward(ctx, output, loss):
        ctx.save_for_backward(loss)
        return output

    @staticmethod
    def backward(ctx, grad):
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, AttachLoss.scale)


class IOFunction(torch.nn.Module):
    """Base of an IO function: forward(x [T, d], context [T, C]) -> W_out read(x, c) [T, d].

    Subclasses define `read(x, context, extra) -> [T, value_dim]` (context: the 2 + W columns;
    extra: the function's own provider columns, or None) and call `build_out(value_dim)`."""

    is_io = True
    # matrices in d_model space (for nGPT): W_out [d, value_dim] by its columns, a learned query
    # W_q [K, d] by its rows; own value embeddings are not in d_model space and stay as they are
    unit_sphere_dims = {"out_proj.weight": 0, "query_proj.weight": 1}

    def __init__(self, spec: IOSpec, settings: IOSettings):
        super().__init__()
        self.spec, self.settings = spec, settings
        self.extra_columns: Optional[tuple[int, int]] = None  # (first column, width): set by the layout

    def build_out(self, value_dim: int) -> None:
        self.value_dim = value_dim
        self.out_proj = torch.nn.Linear(value_dim, self.settings.hidden_size, bias=False)
        torch.nn.init.normal_(self.out_proj.weight, std=self.settings.init_std)

    def read(self, x: torch.Tensor, context: torch.Tensor, extra: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, context: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [T, d], context [T, C] (scale [T]: the routing weights, applied before the cast to x's dtype)."""
        base = context[:, :CONTEXT_FIXED_COLUMNS + self.settings.context_window]
        extra = None
        if self.extra_columns is not None:
            start, width = self.extra_columns
            if context.shape[1] < start + width:
                raise RuntimeError(f"{self.spec.where()}: the context has {context.shape[1]} columns, its layout "
                                   f"needs {start + width}: build it with the model's ContextLayout")
            extra = context[:, start:start + width]
        if x.shape[0] == 0:  # no token routed here in this micro-batch
            values = x.new_zeros(0, self.value_dim)
        else:
            values = self.read(x, base, extra)
        out = self.out_proj(values.to(self.out_proj.weight.dtype))  # [T, d]
        if scale is not None:
            out = out * scale.unsqueeze(-1)
        return out.to(x.dtype)

    # --- the source's identity: recorded by checkpoints and exports, never its contents
    def source_identity(self) -> dict:
        return {"name": self.spec.name, "kind": self.spec.kind, "source": self.spec.source}

    def after_step(self, iteration: int) -> Optional[str]:
        """Work after optimizer step `iteration` (a learned store re-indexes its keys); a line for
        the training log, or None."""
        return None

    def report(self) -> dict[str, tuple[float, float]]:
        """{name: (sum, count)} accumulated since the last report, for the training log (a
        retrieval's recall, an own loss); the log shows sum / count over the layers. Restarts."""
        return {}

    def check_source(self, recorded: dict) -> None:
        """At load: the source must be the recorded one (kinds with content override this)."""
        if recorded.get("source") != self.spec.source and not self.settings.source_swap:
            raise IOSourceError(f"{self.spec.where()}: the model was trained with source "
                                f"{recorded.get('source')!r}. Fix: configure that source, or ask for a swap "
                                "(flaming_io_store_swap=True) to use this one.")


class IOKind:
    """One kind of IO function. Subclass it in a module of its own and list it in neon/io/kinds.py
    (or `neon.io.kinds.register` it at run time)."""

    name: str = ""
    options: type = type(None)
    """A dataclass of the kind's options (keys of the entry besides name, kind, source, bank)."""
    run_options: tuple[str, ...] = ()
    """Options that say how the function runs, not what it computes (search parameters, time
    limits): a resume and the HF export may change them."""

    def validate(self, spec: IOSpec) -> None:
        """Check the options' values (no I/O); raise IOSourceError naming the entry and the fix."""

    def check_source(self, spec: IOSpec, settings: IOSettings) -> None:
        """Open the source now (before the model is built), so a missing or foreign source fails
        with an IOSourceError naming the function and the fix."""

    def build(self, spec: IOSpec, settings: IOSettings) -> IOFunction:
        raise NotImplementedError

    def context_columns(self, specs: list[IOSpec], settings: IOSettings) -> dict[str, int]:
        """{function name: width} of the extra context columns this kind's functions among `specs`
        read (pure: no source is opened beyond its description); none by default."""
        return {}

    def providers(self, specs: list[IOSpec], settings: IOSettings) -> list[ContextProvider]:
        """The providers that compute those columns, with the same names and widths in the same order."""
        return []

    def macs(self, spec: IOSpec, settings: IOSettings) -> float:
        """Multiply-adds per routed token of the function's learned, on-device part (matmuls only)."""
        raise NotImplementedError(f"IO kind {self.name!r} does not count its FLOPs (IOKind.macs)")

    def forward_only_macs(self, specs: list[IOSpec], settings: IOSettings, seq_length: int, keys) -> float:
        """Multiply-adds per token of the kind's work that runs forward only, once per forward pass
        (a frozen model); `keys(window)` gives the keys one query attends to on average."""
        return 0.0


# --- the registry (neon/io/kinds.py registers the built-in kinds) -----------------------------------

KINDS: dict[str, IOKind] = {}


def register(kind: IOKind) -> IOKind:
    """Add an IO kind (its name must be new)."""
    if kind.name in KINDS and type(KINDS[kind.name]) is not type(kind):
        raise ValueError(f"an IO kind named {kind.name!r} is registered already")
    KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    KINDS.pop(name)


def kind_of(name: str, where: str = "flaming_io_functions") -> IOKind:
    if name not in KINDS:
        raise IOSourceError(f"{where}: kind={name!r} is not an IO kind. Fix: use one of {sorted(KINDS)}.")
    return KINDS[name]
