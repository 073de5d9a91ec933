"""The FlamingMoE block: per token, functions chosen from a global bank and a per-layer bank.

    x' = RMSNorm(h)                                     (the block's pre-norm)
    r  = x' + sum_{g in top-k(global)} p_g f_g(x') + sum_{f in top-k(layer)} p_f f_f(x')
    h  = h + r                                          ('between': own residual)

Each bank is a megatron-core MoELayer: its router (neon.flaming.router), megatron's token
dispatcher (alltoall or allgather) and the bank's functions as experts, sharded over the
expert-parallel group. Only the chosen functions run on the chosen tokens: the cost grows with
k, not with the bank size. Every layer has its own router for each bank; the global bank's
functions are one module owned by the model (one replica per pipeline stage, kept equal by
summing their gradients over the stages: see `attach_global_bank`).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.spec_utils import ModuleSpec

from neon.flaming.functions import FunctionBankExperts, SharedFunctions, bank_config
from neon.flaming.io import io_specs
from neon.flaming.router import FlamingRouter

BANKS = ("global", "layer")


def bank_size(config, bank: str) -> int:
    """Functions in the bank: its learned ones, then its IO functions (neon/flaming/io.py)."""
    return num_learned(config, bank) + len(io_specs(config, bank))


def num_learned(config, bank: str) -> int:
    return config.flaming_global_functions if bank == "global" else config.flaming_layer_functions


def bank_kind(config, bank: str) -> str:
    return config.flaming_global_kind if bank == "global" else config.flaming_layer_kind


class FunctionBank(MoELayer):
    """One bank in one layer: route (this layer's router) -> dispatch -> functions -> combine.

    `usage` counts the tokens routed to each function (this rank's tokens, since the last
    `reset_usage`); no routing tensors are kept."""

    def __init__(self, config, bank: str, layer_number: Optional[int] = None, pg_collection=None):
        assert bank in BANKS, bank
        n, kind = bank_size(config, bank), bank_kind(config, bank)
        experts = ModuleSpec(module=FunctionBankExperts, params={"kind": kind})
        # --- IO functions (neon/flaming/io_bank.py): mixed experts, context-carrying dispatcher
        has_io = bool(io_specs(config, bank))
        if has_io:
            from neon.flaming.io_bank import MixedFunctionExperts

            experts = ModuleSpec(module=MixedFunctionExperts, params={
                "kind": kind, "num_learned": num_learned(config, bank), "bank": bank})
        if bank == "global":  # the model's one module (`attach_global_bank`), with or without IO
            experts = ModuleSpec(module=SharedFunctions)
        router = functools.partial(FlamingRouter, bank=bank, mode=config.flaming_router,
                                   temperature=config.flaming_gumbel_temperature)
        super().__init__(bank_config(config, n, kind),
                         MoESubmodules(experts=experts, router=router),
                         layer_number=layer_number,
                         pg_collection=pg_collection or get_default_pg_collection())
        self.bank = bank
        self.register_buffer("usage", torch.zeros(n, dtype=torch.long), persistent=False)
        self.has_io = has_io
        if has_io:
            from neon.flaming.io_bank import use_context_dispatcher

            use_context_dispatcher(self, pg_collection or get_default_pg_collection())

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None, context=None):
        """megatron's MoELayer forward; with IO functions, the token context [s, b, C] goes along."""
        if not self.has_io:
            return super().forward(hidden_states, intermediate_tensors, padding_mask=padding_mask)
        from neon.flaming.io_bank import io_bank_forward

        return io_bank_forward(self, hidden_states, context, padding_mask=padding_mask)

    def route(self, hidden_states, padding_mask=None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        with torch.no_grad():
            self.usage += routing_map.sum(dim=0)
        return probs, routing_map

    def reset_usage(self) -> None:
        self.usage.zero_()


class FlamingMoE(MegatronModule):
    """The block on normalized input x' [s, b, d] -> (r [s, b, d], None), an MLP-shaped module."""

    def __init__(self, config, layer_number: Optional[int] = None, pg_collection=None, **_):
        super().__init__(config=config)
        pg_collection = pg_collection or get_default_pg_collection()
        self.identity = config.flaming_identity
        self.global_bank = (FunctionBank(config, "global", layer_number, pg_collection)
                            if bank_size(config, "global") else None)
        self.layer_bank = (FunctionBank(config, "layer", layer_number, pg_collection)
                           if bank_size(config, "layer") else None)
        if layer_number is not None:  # the routers log their losses per layer
            self.set_layer_number(layer_number)

    @property
    def has_io(self) -> bool:
        return any(b.has_io for b in self.banks())

    def banks(self) -> list[FunctionBank]:
        return [b for b in (self.global_bank, self.layer_bank) if b is not None]

    def set_layer_number(self, layer_number: int) -> None:
        for bank in self.banks():
            bank.set_layer_number(layer_number)

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, context=None, **_):
        """context: the token context [s, b, C] (neon/flaming/io.py), used by IO functions."""
        out = hidden_states if self.identity else torch.zeros_like(hidden_states)
        for bank in self.banks():
            extra = {"context": context} if bank.has_io else {}
            y, _ = bank(hidden_states, padding_mask=padding_mask, **extra)
            out = out + y.to(out.dtype)
        return out, None


def build_global_bank(config, pg_collection=None) -> FunctionBankExperts:
    """The global bank's functions (this rank's EP shard: learned, then `bank=global` IO
    functions), initialised from the config's seed alone so that every pipeline stage builds
    the same replica (the IO functions' learned parts too)."""
    pg_collection = pg_collection or get_default_pg_collection()
    n, kind = bank_size(config, "global"), config.flaming_global_kind
    cfg = bank_config(config, n, kind)
    local = n // pg_collection.ep.size()
    if io_specs(config, "global"):
        from neon.flaming.io_bank import MixedFunctionExperts

        bank = MixedFunctionExperts(local, cfg, kind=kind, pg_collection=pg_collection,
                                    num_learned=config.flaming_global_functions, bank="global")
    else:
        bank = FunctionBankExperts(local, cfg, kind=kind, pg_collection=pg_collection)
    bank.reset_parameters_deterministic(config.flaming_init_seed)
    bank.replicated_over_pipeline = True
    for p in bank.parameters():
        # finalize_model_grads sums these over the pipeline stages (config.has_cond_embedder)
        p.pipeline_parallel = True
    return bank


def flaming_blocks(model: torch.nn.Module) -> list[FlamingMoE]:
    return [m for m in model.modules() if isinstance(m, FlamingMoE)]


def attach_global_bank(model: torch.nn.Module, config, pg_collection=None) -> Optional[FunctionBankExperts]:
    """Give `model` (one pipeline stage) its replica of the global bank as
    `model.flaming_global_functions` and point every layer's global bank at it. The replicas
    after the first stage's are marked `shared` (as megatron marks the last stage's copy of
    tied embeddings), so the gradient norm (and clipping) counts the bank once."""
    if config.flaming_moe == "off" or not bank_size(config, "global"):
        return None
    bank = build_global_bank(config, pg_collection)
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_rank() > 0 or (getattr(model, "vp_stage", None) or 0) > 0:
        for p in bank.parameters():  # a replica: megatron's grad norm counts it once, on stage 0
            p.shared = True
    model.flaming_global_functions = bank
    for block in flaming_blocks(model):
        block.global_bank.experts.attach(bank)
    return bank


def usage_counts(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{'layer<l>.<bank>': tokens per function} accumulated on this rank since the last reset."""
    out = {}
    for block in flaming_blocks(model):
        for bank in block.banks():
            out[f"layer{bank.layer_number}.{bank.bank}"] = bank.usage.clone()
    return out


def reset_usage(model: torch.nn.Module) -> None:
    for block in flaming_blocks(model):
        for bank in block.banks():
            bank.reset_usage()
