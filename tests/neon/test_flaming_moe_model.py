"""Whole Neon models with FlamingMoE (alone, with DiffAttention, with nGPT) give the logits of the
Hugging Face reference NeonForCausalLM (neon/hf/modeling_neon.py, same routing decisions in
evaluation), at EP=1, EP=2 and PP=2 in real gloo processes; the weight mapping round-trips
exactly; with nGPT the functions' weights stay on the unit sphere through a training step."""

import pytest
import torch
from megatron.core.optimizer import OptimizerConfig

from neon.config import NeonConfig
from neon.flaming import usage_counts
from neon.hf.modeling_neon import NeonForCausalLM
from neon.ngpt import NORM_DIM_ATTR
from neon.state_dict_adapter import neon_hf_config
from neon.training.optim import build_optimizer
from neon.training.step import train_step
from tests.dist import run_distributed
from tests.parity import assert_matches, check_against_reference, gamma, parallel_config

TINY = dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
            vocab_size=64, max_position_embeddings=32, sliding_window=5)
BATCH, SEQ = 2, 12
CASES = {
    "between-gumbel": dict(flaming_moe="between", flaming_global_functions=4, flaming_layer_functions=4,
                           flaming_global_kind="linear", flaming_layer_kind="swiglu", flaming_ffn_hidden_size=16,
                           flaming_router="gumbel", flaming_topk=1),
    "mlp-topk2": dict(flaming_moe="mlp", flaming_global_functions=4, flaming_layer_functions=8,
                      flaming_global_kind="lowrank", flaming_layer_kind="linear", flaming_lowrank_rank=4,
                      flaming_router="topk", flaming_topk=2),
    "between-diffattn": dict(flaming_moe="between", flaming_global_functions=8, flaming_layer_functions=2,
                             flaming_global_kind="swiglu", flaming_layer_kind="lowrank", flaming_ffn_hidden_size=8,
                             flaming_lowrank_rank=4, flaming_router="gumbel", flaming_topk=2,
                             diff_attention="matched"),
    "ngpt-between": dict(flaming_moe="between", flaming_global_functions=4, flaming_layer_functions=4,
                         flaming_global_kind="linear", flaming_layer_kind="lowrank", flaming_lowrank_rank=4,
                         flaming_router="gumbel", flaming_topk=1, ngpt=True),
    "ngpt-mlp-diffattn": dict(flaming_moe="mlp", flaming_global_functions=4, flaming_layer_functions=4,
                              flaming_global_kind="swiglu", flaming_layer_kind="linear", flaming_ffn_hidden_size=8,
                              flaming_router="topk", flaming_topk=2, ngpt=True, diff_attention="matched"),
}
NGPT_CASES = [c for c in CASES if c.startswith("ngpt")]
# |norm(w) - 1| after the optimizer's renormalisation: three fp32 reductions of at most n terms (the
# norm it divides by, the division, the norm measured here), each within gamma_n (tests/parity.py)
SPHERE_TOL = 3 * gamma(max(TINY["hidden_size"], TINY["ffn_hidden_size"]))
TOKENS = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


def reference_model(cfg: NeonConfig) -> NeonForCausalLM:
    torch.manual_seed(0)
    hf = NeonForCausalLM(neon_hf_config(cfg, initializer_range=0.1)).eval()
    if cfg.ngpt:
        with torch.no_grad():  # nGPT scaling vectors away from their init; weights on the sphere
            for p in hf.parameters():
                if p.ndim == 1:
                    p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
            hf.normalize_ngpt_weights()
    return hf


def flaming_probe(chunks, drawn: dict) -> dict:
    """After the evaluation forward: how many functions each bank used; with nGPT, a training step."""
    cfg = chunks[0].module.config
    return dict(used=[int((c > 0).sum()) for c in usage_counts(chunks[0].module).values()],
                sphere=ngpt_step_keeps_functions_on_sphere(chunks, cfg, TOKENS) if cfg.ngpt else None)


def check_model_parity(cases: list[str]):
    results = []
    for name in cases:
        cfg = parallel_config(**TINY, **CASES[name])
        r = check_against_reference(cfg, reference_model(cfg), TOKENS, probe=flaming_probe)
        results.append(dict(r, case=name, mapped_flaming=sum("flaming" in k or "router" in k for k in r["names"])))
    return results


def ngpt_step_keeps_functions_on_sphere(chunks, cfg, tokens) -> dict:
    """One megatron training step (nGPT's optimizer hook): the FlamingMoE functions moved and their
    tagged weight vectors still have unit norm."""
    model = chunks[0].module
    tagged = {n: p for n, p in model.named_parameters()
              if hasattr(p, NORM_DIM_ATTR) and ("experts" in n or "flaming_global" in n)}
    before = {n: p.detach().clone() for n, p in tagged.items()}
    model.train()
    opt = build_optimizer(chunks, OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, bf16=False))
    batch = dict(tokens=tokens, labels=tokens.roll(-1, 1), loss_mask=torch.ones(BATCH, SEQ),
                 position_ids=torch.arange(SEQ).expand(BATCH, SEQ))
    train_step(chunks, opt, iter([batch]), cfg, num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH)
    norm_err = max((torch.linalg.vector_norm(p.detach(), dim=getattr(p, NORM_DIM_ATTR)) - 1).abs().max().item()
                   for p in tagged.values())
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in tagged.items())
    return dict(tagged=len(tagged), norm_err=norm_err, moved=moved)


LAYOUTS = {
    "ep1": (1, {}, list(CASES)),
    "ep2": (2, {"ep": 2}, [c for c in CASES if c not in NGPT_CASES] + NGPT_CASES[:1]),
    "pp2": (2, {"pp": 2}, list(CASES)),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_hf_reference(layout):
    world, parallel, cases = LAYOUTS[layout]
    ranks = run_distributed(check_model_parity, world, **parallel, kwargs={"cases": cases}, timeout=300)
    for i, case in enumerate(cases):
        per_rank = [rank[i] for rank in ranks]
        assert_matches(per_rank, f"{layout} {case}")  # logits (evaluation: same routing), round trip
        for r in per_rank:
            assert r["mapped_flaming"] > 0, r
            assert min(r["used"]) >= 2, ("routing collapsed to one function", r)
            if r["sphere"] is not None:
                assert r["sphere"]["tagged"] > 0 and r["sphere"]["moved"] > 1e-4, r
                assert r["sphere"]["norm_err"] <= SPHERE_TOL, r
