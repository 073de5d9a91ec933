"""Whole Neon models with FlamingMoE (alone, with DiffAttention, with nGPT) give the logits of the
Hugging Face reference NeonForCausalLM (neon/hf/modeling_neon.py, same routing decisions in
evaluation), at EP=1, EP=2 and PP=2 in real gloo processes; the weight mapping round-trips
exactly; with nGPT the functions' weights stay on the unit sphere through a training step."""

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from neon.config import NeonConfig
from neon.flaming import usage_counts
from neon.hf.modeling_neon import NeonForCausalLM
from neon.model import build_model
from neon.ngpt import NORM_DIM_ATTR
from neon.state_dict_adapter import hf_to_megatron, megatron_to_hf, neon_hf_config
from neon.training.optim import build_optimizer
from neon.training.step import build_model_chunks, train_step
from tests.dist import run_distributed
from tests.neon.test_mistral_parity import forward_logits

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


def model_config(case: dict) -> NeonConfig:
    return NeonConfig(**TINY, **case,
                      tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                      pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
                      expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
                      pipeline_dtype=torch.float32)


def load_stage_ep(model, hf_state: dict, cfg: NeonConfig) -> None:
    sd = hf_to_megatron(hf_state, cfg, layer_offset=get_transformer_layer_offset(cfg),
                        num_layers=len(model.decoder.layers), pre_process=model.pre_process,
                        post_process=model.post_process,
                        ep_rank=parallel_state.get_expert_model_parallel_rank(),
                        ep_size=parallel_state.get_expert_model_parallel_world_size())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)


def check_model_parity(cases: list[str]):
    tokens = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    results = []
    for name in cases:
        cfg = model_config(CASES[name])
        torch.manual_seed(0)
        hf = NeonForCausalLM(neon_hf_config(cfg, initializer_range=0.1)).eval()
        if cfg.ngpt:
            with torch.no_grad():  # nGPT scaling vectors away from their init; weights on the sphere
                for p in hf.parameters():
                    if p.ndim == 1:
                        p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
                hf.normalize_ngpt_weights()
        hf_state = {k: v.clone() for k, v in hf.state_dict().items()}
        with torch.no_grad():
            expected = hf(tokens).logits
        chunks = build_model_chunks(cfg, build_model)
        model = chunks[0].module
        load_stage_ep(model, hf_state, cfg)
        model.eval()
        with torch.no_grad():
            logits = forward_logits(model, cfg, tokens)
        # megatron -> HF: this stage's tensors, with every EP rank's functions
        own = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        expert_shards = [None] * parallel_state.get_expert_model_parallel_world_size()
        torch.distributed.all_gather_object(expert_shards, own, group=parallel_state.get_expert_model_parallel_group())
        back = megatron_to_hf([own], cfg, layer_offset=get_transformer_layer_offset(cfg), expert_shards=expert_shards)
        used = [int((c > 0).sum()) for c in usage_counts(model).values()]
        results.append(dict(
            case=name, diff=None if logits is None else (logits - expected).abs().max().item(),
            scale=expected.abs().max().item(), used=used,
            roundtrip=len(back) > 0 and all(torch.equal(back[k], hf_state[k]) for k in back),
            mapped_flaming=sum("flaming" in k or "router" in k for k in back),
            sphere=ngpt_step_keeps_functions_on_sphere(chunks, cfg, tokens) if cfg.ngpt else None))
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
    for rank in ranks:
        for r in rank:
            assert r["roundtrip"] and r["mapped_flaming"] > 0, r
            assert min(r["used"]) >= 2, ("routing collapsed to one function", r)
            if r["sphere"] is not None:
                assert r["sphere"]["tagged"] > 0 and r["sphere"]["moved"] > 1e-4, r
                assert r["sphere"]["norm_err"] < 1e-5, r
    diffs = [r for rank in ranks for r in rank if r["diff"] is not None]
    assert len(diffs) >= len(cases), "no rank produced logits"
    for r in diffs:
        assert r["scale"] > 0.1, r
        assert r["diff"] <= 1e-4, r
