"""The FlamingMoE block (megatron router + token dispatcher + EP-sharded functions) computes what a
plain-PyTorch dense formulation of the same block computes: every function on every token,
weighted by the routing weights (same router weights, same choices, same Gumbel noise).
Outputs and gradients (input, routers, functions) agree to 1e-4 in fp32, at EP=1 and EP=2, with
the alltoall and the allgather dispatcher, in real gloo processes."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from neon.config import NeonConfig
from neon.flaming.block import FlamingMoE, build_global_bank
from tests.dist import run_distributed

D, SEQ, BATCH = 16, 6, 2
N_GLOBAL, N_LAYER = 4, 8
# (router, global kind, layer kind, k)
CASES = [("topk", "linear", "swiglu", 2), ("gumbel", "lowrank", "linear", 1), ("gumbel", "swiglu", "lowrank", 2)]
DISPATCHERS = ("alltoall", "allgather")


def block_config(router, gkind, lkind, k, dispatcher) -> NeonConfig:
    return NeonConfig(num_layers=2, hidden_size=D, num_attention_heads=2, ffn_hidden_size=24, vocab_size=32,
                      max_position_embeddings=16, flaming_moe="mlp", flaming_global_functions=N_GLOBAL,
                      flaming_layer_functions=N_LAYER, flaming_global_kind=gkind, flaming_layer_kind=lkind,
                      flaming_router=router, flaming_topk=k, flaming_gumbel_temperature=0.7,
                      flaming_ffn_hidden_size=12, flaming_lowrank_rank=3, flaming_token_dispatcher=dispatcher,
                      expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
                      pipeline_dtype=torch.float32)


# --- the plain-PyTorch reference ---------------------------------------------------------------


def function_params(kind: str, n: int, gen: torch.Generator) -> list[dict]:
    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * 0.3

    if kind == "linear":
        return [{"w": rnd(D, D)} for _ in range(n)]
    if kind == "swiglu":
        return [{"gate": rnd(12, D), "up": rnd(12, D), "down": rnd(D, 12)} for _ in range(n)]
    return [{"a": rnd(3, D), "b": rnd(D, 3)} for _ in range(n)]  # lowrank


def apply_function(kind: str, p: dict, x: torch.Tensor) -> torch.Tensor:
    if kind == "linear":
        return x @ p["w"].T
    if kind == "swiglu":
        return (F.silu(x @ p["gate"].T) * (x @ p["up"].T)) @ p["down"].T
    return (x @ p["a"].T) @ p["b"].T


def reference_gumbel(shape) -> torch.Tensor:
    return -torch.log(-torch.log(torch.rand(shape)))


def reference_block(x, banks, router, k, tau, noises, training=True):
    """x [T, d] -> x + sum over banks of sum_i w_i(x) f_i(x), with all f_i computed (dense)."""
    out = x
    for (kind, w_router, fns), noise in zip(banks, noises):
        logits = x @ w_router.T  # [T, n]
        if router == "topk":  # softmax over the bank, the k largest weighted by their probability
            p = torch.softmax(logits, dim=-1)
            top = torch.topk(p, k, dim=-1).indices
            weights = torch.zeros_like(p).scatter(1, top, p.gather(1, top))
        else:  # straight-through hard Gumbel-softmax: forward 1, backward d softmax
            scores = logits + noise if training else logits
            y = torch.softmax(scores / tau, dim=-1)
            top = torch.topk(scores, k, dim=-1).indices
            hard = torch.zeros_like(y).scatter(1, top, 1.0)
            weights = hard * (1.0 + y - y.detach())
        dense = torch.stack([apply_function(kind, p, x) for p in fns], dim=1)  # [T, n, d]
        out = out + (weights.unsqueeze(-1) * dense).sum(dim=1)
    return out


# --- loading the same weights into the megatron block -------------------------------------------


def load_functions(experts, kind: str, fns: list[dict]) -> None:
    first = parallel_state.get_expert_model_parallel_rank() * experts.num_local_experts
    with torch.no_grad():
        for i, module in enumerate(experts.local_experts):
            p = fns[first + i]
            if kind == "linear":
                module.linear.weight.copy_(p["w"])
            elif kind == "swiglu":
                module.linear_fc1.weight.copy_(torch.cat([p["gate"], p["up"]]))
                module.linear_fc2.weight.copy_(p["down"])
            else:
                module.linear_fc1.weight.copy_(p["a"])
                module.linear_fc2.weight.copy_(p["b"])


def function_grads(experts, kind: str) -> dict:
    """{bank index: {param: grad}} for this rank's functions, in the reference's naming."""
    first = parallel_state.get_expert_model_parallel_rank() * experts.num_local_experts
    out = {}
    for i, m in enumerate(experts.local_experts):
        if kind == "linear":
            g = {"w": m.linear.weight.grad}
        elif kind == "swiglu":
            gate, up = torch.chunk(m.linear_fc1.weight.grad, 2)
            g = {"gate": gate, "up": up, "down": m.linear_fc2.weight.grad}
        else:
            g = {"a": m.linear_fc1.weight.grad, "b": m.linear_fc2.weight.grad}
        out[first + i] = g
    return out


def check_block_parity():
    ep = parallel_state.get_expert_model_parallel_world_size()
    rank = parallel_state.get_expert_model_parallel_rank()
    results = []
    for dispatcher in DISPATCHERS:
        for router, gkind, lkind, k in CASES:
            cfg = block_config(router, gkind, lkind, k, dispatcher)
            gen = torch.Generator().manual_seed(7)
            banks = [(gkind, torch.randn(N_GLOBAL, D, generator=gen), function_params(gkind, N_GLOBAL, gen)),
                     (lkind, torch.randn(N_LAYER, D, generator=gen), function_params(lkind, N_LAYER, gen))]
            # every EP rank's tokens (each rank runs its own) and output weights of the test loss
            xs = [torch.randn(SEQ, BATCH, D, generator=gen) for _ in range(ep)]
            rs = [torch.randn(SEQ, BATCH, D, generator=gen) for _ in range(ep)]

            block = FlamingMoE(cfg, layer_number=1)
            global_functions = build_global_bank(cfg)
            block.global_bank.experts.attach(global_functions)
            with torch.no_grad():
                block.global_bank.router.weight.copy_(banks[0][1])
                block.layer_bank.router.weight.copy_(banks[1][1])
            load_functions(global_functions, gkind, banks[0][2])
            load_functions(block.layer_bank.experts, lkind, banks[1][2])
            block.train()

            x = xs[rank].clone().requires_grad_(True)
            torch.manual_seed(100)  # the Gumbel noise: global bank first, then the layer bank
            out, _ = block(x)
            (out * rs[rank]).sum().backward()

            # reference: the same noise on every rank (same seed, same shapes)
            torch.manual_seed(100)
            noises = [reference_gumbel((SEQ * BATCH, N_GLOBAL)), reference_gumbel((SEQ * BATCH, N_LAYER))]
            ref_banks = [(kind, w.clone().requires_grad_(True),
                          [{n: t.clone().requires_grad_(True) for n, t in f.items()} for f in fns])
                         for kind, w, fns in banks]
            ref_outs = []
            for r in range(ep):
                xr = xs[r].clone().requires_grad_(True)
                # the router weights are per rank (not expert-parallel): their grads come from own tokens
                own = [(kind, w if r == rank else w.detach(), fns) for kind, w, fns in ref_banks]
                o = reference_block(xr.view(-1, D), own, router, k, 0.7, noises).view_as(xr)
                (o * rs[r]).sum().backward()
                ref_outs.append((o, xr))
            ref_out, ref_x = ref_outs[rank]

            diffs = {"out": (out - ref_out).abs().max().item(),
                     "dx": (x.grad - ref_x.grad).abs().max().item(),
                     "router_global": (block.global_bank.router.weight.grad - ref_banks[0][1].grad).abs().max().item(),
                     "router_layer": (block.layer_bank.router.weight.grad - ref_banks[1][1].grad).abs().max().item()}
            fn_diff = 0.0
            for (kind, _, ref_fns), experts in zip(ref_banks, (global_functions, block.layer_bank.experts)):
                for idx, grads in function_grads(experts, kind).items():
                    for name, g in grads.items():
                        fn_diff = max(fn_diff, (g - ref_fns[idx][name].grad).abs().max().item())
            diffs["functions"] = fn_diff
            results.append(dict(
                case=f"{dispatcher}/{router}/{gkind}+{lkind}/k{k}", diffs=diffs,
                bank_effect=(ref_out - xs[rank]).abs().max().item(),
                used=[int((b.usage > 0).sum()) for b in block.banks()],
                fn_grad_scale=max(g.abs().max().item() for kind, _, fns in ref_banks for f in fns
                                  for g in (t.grad for t in f.values()) if g is not None)))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("ep", [1, 2], ids=["ep1", "ep2"])
def test_block_matches_dense_reference(ep):
    per_rank = run_distributed(check_block_parity, ep, ep=ep, timeout=300)
    for results in per_rank:
        assert len(results) == len(CASES) * len(DISPATCHERS)
        for r in results:
            assert max(r["diffs"].values()) <= 1e-4, (r["case"], r["diffs"])
            assert r["bank_effect"] > 0.1, (r["case"], "the banks barely change the output")
            assert r["fn_grad_scale"] > 1e-2, (r["case"], "function gradients are degenerate")
            assert min(r["used"]) >= 2, (r["case"], "routing sent every token to one function", r["used"])
