"""megatron-core token dispatchers that also move a per-token context with the routed tokens.

megatron-core 0.16.1's `token_dispatch` carries the hidden states and the routing probabilities
only. An IO function also needs each routed token's context (token ids, positions, sequence ids:
any [tokens, C] int or float tensor; packing ids into bf16 columns would be inexact). These
subclasses add `dispatch_context(context)`, which sends the context along the same route as the
hidden states, with the maps the dispatcher computed for them in this forward pass:

  alltoall:  permute (index_select with `reversed_local_input_permutation_mapping`)
             -> all-to-all over EP (`output_splits` / `input_splits`)
             -> sort by local expert (`num_global_tokens_per_local_expert`,
                `sort_input_by_local_experts`) when a rank holds more than one expert
  allgather: all-gather over TP x EP -> permute with `reversed_local_input_permutation_mapping`
             (the local experts' map, set in `dispatch_postprocess`)

Call it after `dispatch_postprocess`; its rows then line up with the permuted hidden states
the experts receive. The context carries no gradient (it is an input, like token ids). The
experts' outputs are unpermuted and combined by megatron's own path, so nothing of the context
needs to travel back. Supported: no capacity dropping/padding, no fused permutation, expert TP 1.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import all_to_all, gather_from_sequence_parallel_region
from megatron.core.transformer.moe.moe_utils import sort_chunks_by_idxs
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)

# the megatron attributes dispatch_context reads (tests/megatron_plugins checks they still exist)
ALLTOALL_ATTRIBUTES = ("reversed_local_input_permutation_mapping", "input_splits", "output_splits",
                       "num_global_tokens_per_local_expert", "sort_input_by_local_experts",
                       "num_local_experts", "ep_group", "ep_size", "tp_size", "drop_and_pad")
ALLGATHER_ATTRIBUTES = ("reversed_local_input_permutation_mapping", "tp_ep_group", "ep_size",
                        "tp_size")


def _check_supported(dispatcher) -> None:
    cfg = dispatcher.config
    if cfg.moe_permute_fusion or getattr(dispatcher, "drop_and_pad", False) or dispatcher.tp_size > 1:
        raise NotImplementedError(
            "the context dispatcher supports unfused permutation, no capacity padding and expert "
            "tensor parallelism 1 (moe_permute_fusion=False, moe_pad_expert_input_to_capacity=False, "
            "expert_tensor_parallel_size=1)")


class ContextAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's all-to-all dispatcher plus `dispatch_context`."""

    @torch.no_grad()
    def dispatch_context(self, context: torch.Tensor) -> torch.Tensor:
        """context [local tokens, C] -> [tokens for this rank's experts, C], in the experts' order."""
        _check_supported(self)
        out = context.index_select(0, self.reversed_local_input_permutation_mapping)
        if self.ep_size > 1:
            out = all_to_all(self.ep_group, out, self.output_splits, self.input_splits)
        if self.num_local_experts > 1:
            out, _ = sort_chunks_by_idxs(out, self.num_global_tokens_per_local_expert.ravel(),
                                         self.sort_input_by_local_experts)
        return out


class ContextAllGatherTokenDispatcher(MoEAllGatherTokenDispatcher):
    """megatron's all-gather dispatcher plus `dispatch_context`."""

    @torch.no_grad()
    def dispatch_context(self, context: torch.Tensor) -> torch.Tensor:
        """context [local tokens, C] -> [tokens for this rank's experts, C], in the experts' order."""
        _check_supported(self)
        if self.ep_size > 1:
            context = gather_from_sequence_parallel_region(context, group=self.tp_ep_group)
        return context.index_select(0, self.reversed_local_input_permutation_mapping)


DISPATCHERS = {"alltoall": ContextAlltoAllTokenDispatcher,
               "allgather": ContextAllGatherTokenDispatcher}


def context_dispatcher(kind: str, num_local_experts: int, local_expert_indices, config,
                       pg_collection):
    """The context-carrying version of megatron's dispatcher `kind` ('alltoall' or 'allgather')."""
    return DISPATCHERS[kind](num_local_experts, local_expert_indices, config=config,
                             pg_collection=pg_collection)
