"""FlamingMoE's IO functions in a megatron model: the config's entries as IO specs and settings.

The IO kinds themselves (what a function reads and computes, its options, its context columns)
are neon/io/, shared with the Hugging Face export; this module connects them to a NeonConfig:

    io_settings(config)      the model-side settings every IO function is built with
    io_specs(config, bank)   `flaming_io_functions` parsed (each entry's kind checks its options)
    check_io_sources(config) every source opened, before the model is built
    build_io_function(config, spec)   the function, told where its context columns are

Config: `flaming_io_functions`, one string per function (neon/io/base.py):

    "name=facts,kind=store,source=/data/facts_store,query=context,topk=4"
    "name=add,kind=callable,source=my_tools.arith:add,returns=tokens,width=4,timeout=2"
    "name=anchor,kind=model,source=/models/small_lm,layer=-1"
    "name=facts,kind=store,source=/data/facts_store,query=context,bank=global"

`bank` says which bank the function sits in: 'layer' (the default) joins the per-layer bank after
its `flaming_layer_functions` learned ones (bank index F, F+1, ...), one function per layer;
'global' joins the global bank after its `flaming_global_functions` learned ones, one function
shared by every layer (each layer routes to it with its own router).
"""

from __future__ import annotations

import functools
from typing import Optional

import neon.io  # noqa: F401  (registers the built-in IO kinds)
from neon.errors import InfrastructureError, IOSourceError
from neon.io.base import ContextLayout, IOFunction, IOSettings, IOSpec, kind_of
from neon.io.base import io_specs as parse_entries


def io_settings(config) -> IOSettings:
    return IOSettings(hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                      context_window=config.flaming_io_context_window, init_std=config.init_method_std,
                      source_swap=config.flaming_io_store_swap,
                      reuse_search=config.flaming_io_reuse_search)


def io_specs(config, bank: Optional[str] = None) -> list[IOSpec]:
    """The configured IO functions (all, or those of `bank`: 'global' | 'layer'), in config order."""
    return parse_entries(getattr(config, "flaming_io_functions", None) or (), bank)


def check_io_sources(config) -> None:
    """Open every IO function's source now (store files, callable import, frozen model config),
    so a wrong or missing source fails before the model is built, with an error naming it."""
    settings = io_settings(config)
    for spec in io_specs(config):
        kind_of(spec.kind).check_source(spec, settings)


def build_io_function(config, spec: IOSpec) -> IOFunction:
    """The function of `spec`, told where its context columns are, with its source's identity in
    its state dict (`recorded`)."""
    settings = io_settings(config)
    fn = kind_of(spec.kind).build(spec, settings)
    ContextLayout(io_specs(config), settings).attach([fn])
    fn.__class__ = recorded(type(fn))
    return fn


@functools.cache
def recorded(cls: type) -> type:
    """`cls` with its source's identity as the module's extra state (`<prefix>_extra_state` in a
    checkpoint: recorded at save, checked at load, where flaming_io_store_swap may allow another).
    Training's only: the exported model checks the identities its config records instead."""

    class Recorded(cls):
        def get_extra_state(self) -> dict:
            try:
                return {"io_source": self.source_identity()}
            except (OSError, IOSourceError) as e:  # at a save: the source is not the one opened at start
                raise InfrastructureError(f"{self.spec.where()}: its source changed or vanished during the run "
                                          f"({type(e).__name__}: {e}). Fix: restore it, then resume from the latest "
                                          "checkpoint.") from None

        def set_extra_state(self, state) -> None:
            if isinstance(state, dict) and "io_source" in state:
                self.check_source(state["io_source"])

    Recorded.__name__ = Recorded.__qualname__ = cls.__name__
    return Recorded


def token_context(input_ids, window: int, position_ids=None):
    """input_ids [b, s] -> the ids context [s, b, 2 + W] in megatron's [seq, batch] layout."""
    from neon.io.base import token_context as rows

    return rows(input_ids, window, position_ids).transpose(0, 1).contiguous()


def model_context(config, input_ids, position_ids=None, providers=None):
    """The full token context [s, b, C] a model with `config` builds from input_ids [b, s] (the
    ids window and every IO kind's columns, as IOGPTModel builds it); `providers`: the model's
    own (IOGPTModel.io_providers), else new ones."""
    from neon.io.base import ContextLayout, build_context, context_providers

    specs, settings = io_specs(config), io_settings(config)
    providers = context_providers(specs, settings) if providers is None else providers
    ctx = build_context(ContextLayout(specs, settings), providers, input_ids, position_ids, dtype=config.params_dtype)
    return ctx.transpose(0, 1).contiguous()
