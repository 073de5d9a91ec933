"""A FlamingMoE bank holding IO functions: its experts and its forward pass with the context.

A bank with IO functions is [learned f_0 .. f_{F-1}, IO g_0 .. g_{m-1}] (n = F + m, F may be 0:
an IO bank of its own), sharded over expert parallelism like any bank (n / EP per rank,
contiguous). The per-layer bank's are the `bank=layer` IO functions after
`flaming_layer_functions` learned ones, one set per layer; the global bank's are the
`bank=global` ones after `flaming_global_functions`, one set per pipeline stage owned by the
model and run by every layer's global bank through `SharedFunctions` (neon/flaming/block.py).
Routing, dispatch and combine are megatron's; the dispatcher is the context-carrying subclass
(megatron_plugins/context_dispatch.py), so every function receives its tokens' context rows in
the same order as their hidden states:

    route -> permute + dispatch (hidden, probs) -> dispatch_context(c) -> experts(x, p, c)
          -> combine (megatron's unpermute) -> r
"""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, sharded_state_dict_default

from megatron_plugins.context_dispatch import context_dispatcher
from neon.flaming.functions import FunctionBankExperts
from neon.flaming.io import build_io_function, io_specs


class MixedFunctionExperts(FunctionBankExperts):
    """This rank's slice of a bank of F learned functions followed by IO functions."""

    def __init__(self, num_local_experts: int, config, kind: str = "linear", pg_collection=None,
                 num_learned: int = 0, bank: str = "layer"):
        super().__init__(num_local_experts, config, kind=kind, pg_collection=pg_collection)
        specs = io_specs(config, bank)
        self.num_learned = num_learned
        for i in range(num_local_experts):
            g = self.first_function + i
            if g >= num_learned:  # an IO function replaces the placeholder learned one
                fn = build_io_function(config, specs[g - num_learned])
                for p in fn.parameters():  # megatron's expert mark: reduced over expert-DP only
                    p.allreduce = False
                self.local_experts[i] = fn

    def io_functions(self) -> list:
        return [e for e in self.local_experts if getattr(e, "is_io", False)]

    def forward(self, tokens, tokens_per_expert, probs, context=None):
        """tokens [T, d], tokens_per_expert [local], probs [T], context [T, C] -> ([T, d], None)."""
        counts = tokens_per_expert.tolist()
        outs = []
        for expert, x, p, c in zip(self.local_experts, torch.split(tokens, counts),
                                   torch.split(probs, counts), torch.split(context, counts)):
            if getattr(expert, "is_io", False):  # it reads its tokens' context rows
                y = expert(x, c, scale=p)
            else:
                y, _ = expert(x, p)
            outs.append(y)
        out = torch.cat(outs, dim=0)
        # IO outputs need not depend on x (a callable, a `context` query): tie them to the
        # dispatched tokens with an exact zero, so the dispatcher's backward collectives
        # (all-to-all / reduce-scatter of d tokens) run on every EP rank and stay matched.
        return out + 0.0 * tokens.sum(dim=-1, keepdim=True).to(out.dtype), None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Checkpoint keys: learned function g < F on megatron's expert axis of size F
        (`<prefix>experts.<param>`, sharded over EP like any bank); IO function `name` under its
        own key `<prefix>io_functions.<name>.<param>` (one function, held by one EP rank), its
        source identity (path, size, content hash) in its `_extra_state`: recorded, not copied.
        Replicas: over the expert-data-parallel group, as megatron's SequentialMLP."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton = (metadata or {}).get("singleton_local_shards", False)
        out = {}
        for i, expert in enumerate(self.local_experts):
            g, local_prefix = self.first_function + i, f"{prefix}local_experts.{i}."
            offsets = sharded_offsets
            if getattr(expert, "is_io", False):
                sharded_prefix = f"{prefix}io_functions.{expert.spec.name}."
            elif singleton:
                sharded_prefix = f"{prefix}experts.{g}."
            else:
                sharded_prefix = f"{prefix}experts."
                offsets = (*sharded_offsets, (len(sharded_offsets), g, self.num_learned))
            sd = sharded_state_dict_default(expert, local_prefix, offsets, metadata)  # IO functions: plain modules
            replace_prefix_for_sharding(sd, local_prefix, sharded_prefix)
            for sh in sd.values():  # replicated over expert-DP (modulo EP), as megatron's experts
                sh.replica_id = (*sh.replica_id[:2], self.dp_group.rank())
            out.update(sd)
        return self.main_replica_on_first_stage(out)


def use_context_dispatcher(bank, pg_collection) -> None:
    """Swap the bank's megatron dispatcher for its context-carrying subclass (same maps)."""
    bank.token_dispatcher = context_dispatcher(
        bank.config.moe_token_dispatcher_type, bank.num_local_experts, bank.local_expert_indices,
        bank.config, pg_collection)


def io_bank_forward(bank, hidden_states: torch.Tensor, context: torch.Tensor, padding_mask=None):
    """hidden_states [s, b, d], context [s, b, C] -> (r [s, b, d], None): megatron's MoELayer
    steps (route, preprocess, dispatch, experts, combine, postprocess) plus the context."""
    if context is None:
        raise RuntimeError(f"FlamingMoE bank {bank.bank!r} holds IO functions but got no token "
                           "context: build the model with neon.model.build_model and call it with "
                           "input ids (the context is built from them)")
    if padding_mask is not None:
        padding_mask = padding_mask.transpose(0, 1).bool()
    probs, routing_map = bank.route(hidden_states, padding_mask)
    x, probs = bank.preprocess(hidden_states, probs, routing_map)
    x, probs = bank.dispatch(x, probs)
    dispatcher = bank.token_dispatcher
    tokens, tokens_per_expert, probs = dispatcher.dispatch_postprocess(x, probs)
    ctx = dispatcher.dispatch_context(context.reshape(-1, context.shape[-1]))
    out, _ = bank.experts(tokens, tokens_per_expert, probs, context=ctx)
    out = bank.combine(dispatcher.combine_preprocess(out))
    return bank.postprocess(out, None), None
