"""nGPT and DiffAttention+nGPT: the megatron model against the Hugging Face reference
(neon/hf/modeling_neon.py) at TP=1, TP=2 with sequence parallelism and PP=2 in real gloo
processes: logits, the weight mapping both ways, and one training step (megatron's optimizer with
its nGPT weight normalisation vs torch AdamW + `normalize_ngpt_weights()`): same loss, same weights."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig

from neon.config import NeonConfig
from neon.hf.modeling_neon import NeonForCausalLM
from neon.model import build_model
from neon.state_dict_adapter import neon_hf_config
from neon.training.optim import build_optimizer
from neon.training.step import build_model_chunks, train_step
from tests.dist import run_distributed
from tests.neon.test_diff_attention import _stage_hf_state
from tests.neon.test_mistral_parity import forward_logits, load_stage

TINY = dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=4,
            ffn_hidden_size=96, vocab_size=128, max_position_embeddings=64, sliding_window=5)
BATCH, SEQ = 2, 16
# Adam's first step is lr * g / (|g| + eps): a large eps keeps rounding-level gradients from
# turning into lr-sized differences between the two implementations.
ADAM = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.0)


def ngpt_config(diff: str, sequence_parallel: bool = False) -> NeonConfig:
    return NeonConfig(**TINY, ngpt=True, diff_attention=diff, sequence_parallel=sequence_parallel,
                      tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                      pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
                      pipeline_dtype=torch.float32)


def reference_model(cfg: NeonConfig, seed: int = 0) -> NeonForCausalLM:
    torch.manual_seed(seed)
    hf = NeonForCausalLM(neon_hf_config(cfg, initializer_range=0.1))
    with torch.no_grad():  # scaling vectors away from their init, so that each one matters
        for name, p in hf.named_parameters():
            if p.ndim == 1 and "subln" not in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
            if "lambda_" in name:
                p.normal_(0, 0.4)
    return hf


def check_against_reference(cases):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=gen)
    results = []
    for diff, sp in cases:
        cfg = ngpt_config(diff, sp)
        hf = reference_model(cfg)
        hf_state = {k: v.clone() for k, v in hf.state_dict().items()}
        chunks = build_model_chunks(cfg, build_model)
        model = chunks[0].module
        load_stage(model, hf_state, cfg)
        model.eval()
        with torch.no_grad():
            expected = hf.eval()(tokens).logits
            logits = forward_logits(chunks[0], cfg, tokens)
        back = _stage_hf_state(model, cfg)
        roundtrip = len(back) > 0 and all(torch.equal(back[k], hf_state[k]) for k in back)

        model.train()
        opt = build_optimizer(chunks, OptimizerConfig(
            optimizer="adam", lr=ADAM["lr"], weight_decay=0.0, adam_beta1=ADAM["betas"][0],
            adam_beta2=ADAM["betas"][1], adam_eps=ADAM["eps"], clip_grad=0.0, bf16=False, fp16=False))
        batch = dict(tokens=tokens, labels=labels, loss_mask=torch.ones(BATCH, SEQ),
                     position_ids=torch.arange(SEQ).expand(BATCH, SEQ))
        step = train_step(chunks, opt, iter([batch]), cfg, num_microbatches=1, seq_length=SEQ,
                          micro_batch_size=BATCH)
        hf.train()
        hf_opt = torch.optim.AdamW(hf.parameters(), **ADAM)
        loss = F.cross_entropy(hf(tokens).logits.flatten(0, 1), labels.flatten())
        loss.backward()
        hf_opt.step()
        hf.normalize_ngpt_weights()
        after = _stage_hf_state(model, cfg)
        new_hf = hf.state_dict()
        weight_diff, worst = max(((after[k] - new_hf[k]).abs().max().item(), k) for k in after)
        moved = min((new_hf[k] - hf_state[k]).abs().max().item() for k in after)
        results.append(dict(
            roundtrip=roundtrip, names=sorted(back),
            logit_diff=None if logits is None else (logits - expected).abs().max().item(),
            scale=expected.abs().max().item(),
            loss_diff=None if step.loss is None else abs(step.loss - loss.item()),
            weight_diff=weight_diff, worst=worst, moved=moved))
    return results


LAYOUTS = {
    "tp1": (1, {}, [("off", False), ("matched", False), ("expressive", False)]),
    "tp2-sp": (2, {"tp": 2}, [("off", True), ("matched", True)]),
    "pp2": (2, {"pp": 2}, [("off", False), ("matched", False)]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_ngpt_matches_reference(layout):
    world, parallel, cases = LAYOUTS[layout]
    ranks = run_distributed(check_against_reference, world, **parallel, kwargs={"cases": cases},
                            timeout=400)
    for i, (diff, sp) in enumerate(cases):
        per_rank = [r[i] for r in ranks]
        what = f"{layout} ngpt diff={diff} sp={sp}"
        names = {n for r in per_rank for n in r["names"]}
        assert {"lm_head.s_z", "model.layers.0.attn_alpha", "model.layers.3.mlp.s_v"} <= names, what
        assert not any("norm.weight" in n and "subln" not in n for n in names), what
        logit_diffs = [r["logit_diff"] for r in per_rank if r["logit_diff"] is not None]
        loss_diffs = [r["loss_diff"] for r in per_rank if r["loss_diff"] is not None]
        assert logit_diffs and loss_diffs, f"{what}: no rank produced logits/loss"
        assert max(logit_diffs) <= 1e-4, (what, logit_diffs)
        assert per_rank[-1]["scale"] > 0.1, f"{what}: reference logits are degenerate"
        assert all(r["roundtrip"] for r in per_rank), f"{what}: HF -> megatron -> HF changed a tensor"
        assert max(loss_diffs) <= 1e-5, (what, loss_diffs)
        assert min(r["moved"] for r in per_rank) > 1e-4, what
        worst = max((r["weight_diff"], r["worst"]) for r in per_rank)
        assert worst[0] <= 2e-6, (what, worst)



def checkpoint_sharding():
    """TP=2: megatron's distributed-checkpoint entries of the nGPT vectors (global shape, offset)."""
    cfg = ngpt_config("matched", sequence_parallel=True)
    model = build_model(cfg)
    out = {}
    for key, sh in model.sharded_state_dict().items():
        if key.rsplit(".", 1)[-1] in ("s_qk", "s_u", "s_v", "s_z", "alpha"):
            out[key] = (tuple(sh.global_shape), tuple(sh.global_offset), tuple(sh.local_shape),
                        sh.replica_id)
    return out


@pytest.mark.slow
def test_distributed_checkpoint_entries_split_the_scaling_vectors():
    """megatron's default checkpoint entries treat a module's own parameters as replicated (and
    MLP's drop them): s_qk, s_u, s_v and s_z must be saved split over TP ranks, alphas replicated."""
    ranks = run_distributed(checkpoint_sharding, 2, tp=2)
    layer = "decoder.layers.1."
    full = {layer + "self_attention.core_attention.s_qk": TINY["num_attention_heads"] * 8,
            layer + "mlp.s_u": TINY["ffn_hidden_size"], layer + "mlp.s_v": TINY["ffn_hidden_size"],
            "logit_scale.s_z": TINY["vocab_size"]}
    for key, size in full.items():
        for rank, entries in enumerate(ranks):
            global_shape, offset, local, _ = entries[key]  # layers add a leading (layer) axis
            assert global_shape[-1] == size and local == (size // 2,), (key, entries[key])
            assert offset[-1] == rank * size // 2, (key, rank, offset)
    for entries in ranks:
        global_shape, offset, local, _ = entries[layer + "mlp_bda.alpha"]
        assert global_shape[-1] == local[-1] == TINY["hidden_size"] and offset[-1] == 0
