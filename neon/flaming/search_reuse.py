"""Reuse of `context`-query store searches across the layers that share the global bank.

A `store` function with `query=context` in the global bank (`bank=global`) is one function that
every layer of the stage routes to, each with its own router. Its query

    q_t = encoder(ids_{t-n+1..t})              (neon/flaming/encoder.py; frozen, no hidden state)

depends only on token t's ids, so its exact top-k search over the store gives the same entries
in every layer. With `flaming_io_reuse_search` (the default) the stage's IOGPTModel searches once
per micro-batch, for all the micro-batch's tokens, in its forward pass, and appends the entry
indices as int64 columns to the token context. They travel as the context does: through the
dispatcher with the routed tokens' rows, through activation recompute (the model's forward is
not recomputed, so neither is the search) and the pipeline schedule, as a forward argument,
never state. Each layer's read takes its routed tokens' indices from those columns; the rest of
the read (rescoring the k keys, the softmax, the values) is the same code as without reuse, so
the outputs are the same bit for bit.

    store rows scanned per micro-batch and function:   without reuse   N * sum_l T_l
                                                       with reuse      N * T

(T: the micro-batch's tokens on this rank, T_l: those layer l routes to the function, N: store
entries.) With uniform routing T_l = T k / n, so reuse scans less when the stage's L_s layers
give L_s k / n > 1. Under expert parallelism each rank searches for its own tokens (the function
may sit on another EP rank: the indices go to it with the tokens).
"""

from __future__ import annotations

import torch

from neon.flaming.encoder import NgramEncoder
from neon.flaming.io import CONTEXT_FIXED_COLUMNS, IOFunctionSpec, base_context, context_ids, io_specs


def reused_specs(config) -> list[IOFunctionSpec]:
    """The global bank's `context`-query store functions whose search is done once per micro-batch."""
    if not getattr(config, "flaming_io_reuse_search", True):
        return []
    return [s for s in io_specs(config, "global") if s.kind == "store" and s.query == "context"]


def search_layout(config) -> dict[str, tuple[int, int]]:
    """{function name: (first column, topk)} of the reused indices, after the packed frozen-model
    states (neon/flaming/frozen_model.py) in the context."""
    specs = reused_specs(config)
    if not specs:
        return {}
    from neon.flaming.frozen_model import context_layout

    start = CONTEXT_FIXED_COLUMNS + config.flaming_io_context_window
    start += sum(n for _, n in context_layout(config).values())
    out = {}
    for spec in specs:
        out[spec.name] = (start, spec.topk)
        start += spec.topk
    return out


class ContextSearch:
    """One reused search: the store (memory-mapped) and its frozen encoder, no parameters."""

    def __init__(self, spec: IOFunctionSpec, config):
        from neon.flaming.store import open_store

        self.spec, self.window = spec, config.flaming_io_context_window
        self.store = open_store(spec.source, where=spec.where())
        self.encoder = NgramEncoder(self.store.meta["encoder"])
        self.rows = 0  # token searches done (the benchmark and tests read it)

    @torch.no_grad()
    def indices(self, context: torch.Tensor) -> torch.Tensor:
        """context [T, C] -> the top-k entry indices [T, k] int64 of each token's context query."""
        from neon.flaming.store import exact_topk

        q = self.encoder(context_ids(base_context(context, self.window)).cpu())  # the search runs on the CPU
        self.rows += q.shape[0]
        return exact_topk(q, self.store.keys, self.spec.topk)[1]


def build_context_searches(config) -> dict[str, ContextSearch]:
    """{function name: ContextSearch} for this stage (every EP rank: it searches for its tokens)."""
    return {spec.name: ContextSearch(spec, config) for spec in reused_specs(config)}


def append_searches(context: torch.Tensor, searches: dict[str, ContextSearch]) -> torch.Tensor:
    """context [s, b, C] -> [s, b, C + sum of topk]: each reused function's entry indices for every
    token, in `search_layout` order (the order of `build_context_searches`)."""
    if not searches:
        return context
    s, b, c = context.shape
    rows = context.reshape(s * b, c)
    cols = [search.indices(rows).to(context.device).view(s, b, -1) for search in searches.values()]
    return torch.cat([context, *cols], dim=-1)
