"""The context-carrying token dispatchers deliver each routed token's context rows (int64 beyond
float precision, and float columns) to the expert that receives its hidden state, in the same
order, at EP=1 and EP=2, with the alltoall and the allgather dispatcher, in real gloo processes;
an expert output computed from the context alone comes back to its token through megatron's
combine. The megatron attributes the plugin reads must exist after a dispatch."""

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_plugins.context_dispatch import (
    ALLGATHER_ATTRIBUTES,
    ALLTOALL_ATTRIBUTES,
    context_dispatcher,
)
from tests.dist import run_distributed

TOKENS, D, EXPERTS, K = 10, 4, 4, 2
BIG = 2 ** 40  # not representable in fp32/bf16 columns: ids must travel as integers


def _config(kind: str, ep: int) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=1, num_moe_experts=EXPERTS,
                             moe_router_topk=K, moe_token_dispatcher_type=kind, add_bias_linear=False,
                             expert_model_parallel_size=ep, pipeline_dtype=torch.float32)


def _round_trip(kind: str) -> dict:
    ep = parallel_state.get_expert_model_parallel_world_size()
    rank = parallel_state.get_expert_model_parallel_rank()
    local = EXPERTS // ep
    disp = context_dispatcher(kind, local, list(range(rank * local, (rank + 1) * local)), _config(kind, ep),
                              get_default_pg_collection())
    gen = torch.Generator().manual_seed(3 + rank)
    index = torch.arange(TOKENS) + rank * TOKENS  # global token index
    scores = torch.rand(TOKENS, EXPERTS, generator=gen)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(K).indices, True)
    probs = torch.where(routing_map, scores, torch.zeros_like(scores))
    hidden = index.float().unsqueeze(-1).expand(TOKENS, D).contiguous()
    context_int = torch.stack([index + BIG, index * 7], dim=-1)  # [T, 2] int64
    context_float = torch.stack([index.float() * 0.5, -index.float()], dim=-1)  # [T, 2] float

    x, p = disp.dispatch_preprocess(hidden, routing_map, probs)
    x, p = disp.token_dispatch(x, p)
    tokens, per_expert, p = disp.dispatch_postprocess(x, p)
    got_int = disp.dispatch_context(context_int)
    got_float = disp.dispatch_context(context_float)
    attrs = ALLTOALL_ATTRIBUTES if kind == "alltoall" else ALLGATHER_ATTRIBUTES
    missing = [a for a in attrs if not hasattr(disp, a)]
    # an "expert" that answers from the context only: 3 * (context - BIG)
    answer = (3 * (got_int[:, 0] - BIG)).float().unsqueeze(-1).expand(-1, D).contiguous()
    out = disp.combine_postprocess(disp.token_combine(disp.combine_preprocess(answer)))
    chosen = routing_map.sum(1, keepdim=True).float()
    return dict(
        rows=int(tokens.shape[0]), routed=int(per_expert.sum()), missing=missing,
        int_ok=bool(torch.equal(got_int[:, 0] - BIG, tokens[:, 0].long()))
        and bool(torch.equal(got_int[:, 1], 7 * tokens[:, 0].long())),
        float_ok=bool(torch.equal(got_float, torch.stack([tokens[:, 0] * 0.5, -tokens[:, 0]], -1))),
        dtype_ok=got_int.dtype == torch.int64,
        combine_err=(out - 3 * index.float().unsqueeze(-1) * chosen).abs().max().item())


def check_context_dispatch():
    return {kind: _round_trip(kind) for kind in ("alltoall", "allgather")}


@pytest.mark.parametrize("ep", [1, 2], ids=["ep1", "ep2"])
def test_context_travels_with_tokens(ep):
    per_rank = run_distributed(check_context_dispatch, ep, ep=ep, timeout=180)
    total = {kind: 0 for kind in ("alltoall", "allgather")}
    for results in per_rank:
        for kind, r in results.items():
            assert not r["missing"], f"megatron's {kind} dispatcher lost attributes {r['missing']}"
            assert r["rows"] == r["routed"] and r["dtype_ok"], (kind, r)
            assert r["int_ok"] and r["float_ok"], (kind, "context rows do not line up with tokens")
            assert r["combine_err"] == 0.0, (kind, r["combine_err"])
            total[kind] += r["rows"]
    for kind, rows in total.items():  # every routed (token, expert) pair arrived exactly once
        assert rows == ep * TOKENS * K, (kind, rows)
