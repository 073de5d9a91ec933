"""nGPT checked against the paper's equations, written here in plain PyTorch, and parallel runs
checked against a single-process run.

- the normalized residual update equals h <- Norm(h + |alpha| (Norm(x) - h)) on a tiny input;
- the whole model's logits equal a plain-PyTorch nGPT forward (from the HF-layout weights) at
  TP=1, TP=2 with sequence parallelism and PP=2, and hidden states have unit norm after every layer;
- after training steps every weight vector the paper lists has unit norm (checked in the HF
  layout: rows of q/k/v/gate/up/embeddings, columns of o/down), and the weights after N steps are
  the same for one process, DP=2 with megatron DDP, DP=2 with the distributed optimizer (where
  some weight vectors straddle two ranks' shards), TP=2+SP and PP=2.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from neon.config import NeonConfig
from neon.errors import ConfigError
from neon.features import FEATURES
from neon.model import build_model
from neon.ngpt import NormalizedResidual
from neon.ngpt_optimizer import _Slice, normalized_slices
from neon.state_dict_adapter import hf_to_megatron, megatron_to_hf
from neon.training.optim import build_optimizer
from neon.training.step import build_model_chunks, train_step
from tests.dist import run_distributed
from tests.parity import U, gamma, logits_bound

TINY = dict(num_layers=2, hidden_size=48, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=48, vocab_size=80, max_position_embeddings=32, sliding_window=6,
            rope_theta=10000.0, ngpt=True)
SEQ, MICRO_BATCHES, STEPS = 8, 4, 3
BASE = TINY["hidden_size"] ** -0.5  # the "scale" of alpha, s_qk and s_z
# |norm - 1| of a vector put on the sphere in fp32: the norm it is divided by, the division and the
# norm measured here, each an fp32 reduction of at most n terms within gamma_n (tests/parity.py)
SPHERE_TOL = 3 * gamma(max(TINY["hidden_size"], TINY["ffn_hidden_size"]))
# a unit vector rounded to bf16 (8 significant bits): every entry moves by at most 2^-8 of itself
BF16_SPHERE_TOL = 2.0 ** -8 + SPHERE_TOL


def tiny_config(**overrides) -> NeonConfig:
    return NeonConfig(**{**TINY, **overrides},
                      tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                      pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
                      pipeline_dtype=torch.float32)


# --- the paper, in plain PyTorch -------------------------------------------------------------

def norm(x, dim=-1):
    return x / x.norm(dim=dim, keepdim=True)


def rope(x, theta):
    """x [b, heads, s, d] rotated by position (rotate-half convention)."""
    d, s = x.size(-1), x.size(-2)
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(w: dict, tokens: torch.Tensor, collect_hidden: list | None = None):
    """nGPT forward from the equations (arXiv 2410.01131), HF-layout weights, causal + window."""
    d, heads, kv = TINY["hidden_size"], TINY["num_attention_heads"], TINY["num_query_groups"]
    hd, (b, s) = d // heads, tokens.shape
    pos = torch.arange(s)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - TINY["sliding_window"])
    h = w["model.embed_tokens.weight"][tokens]  # [b, s, d]
    for layer in range(TINY["num_layers"]):
        p = f"model.layers.{layer}."
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(b, s, heads, hd).transpose(1, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(b, s, kv, hd).transpose(1, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(b, s, kv, hd).transpose(1, 2)
        q, k = rope(q, TINY["rope_theta"]), rope(k, TINY["rope_theta"])
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        s_qk = (w[p + "self_attn.s_qk"] * (1.0 / BASE)).view(heads, 1, hd)
        q, k = norm(q) * s_qk, norm(k) * s_qk
        scores = (q @ k.transpose(-1, -2)) * math.sqrt(hd)  # sqrt(d), not 1/sqrt(d)
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        att = att.transpose(1, 2).reshape(b, s, heads * hd) @ w[p + "self_attn.o_proj.weight"].T
        alpha_a = (w[p + "attn_alpha"] * (0.05 / BASE)).abs()
        h = norm(h + alpha_a * (norm(att) - h))
        u = (h @ w[p + "mlp.up_proj.weight"].T) * w[p + "mlp.s_u"]
        g = (h @ w[p + "mlp.gate_proj.weight"].T) * w[p + "mlp.s_v"] * math.sqrt(d)
        mlp = (u * F.silu(g)) @ w[p + "mlp.down_proj.weight"].T
        alpha_m = (w[p + "mlp_alpha"] * (0.05 / BASE)).abs()
        h = norm(h + alpha_m * (norm(mlp) - h))
        if collect_hidden is not None:
            collect_hidden.append(h)
    return (h @ w["lm_head.weight"].T) * (w["lm_head.s_z"] * (1.0 / BASE))


# each listed matrix, HF layout: the dim whose vectors live in d_model space get unit norm
UNIT_DIM = {"embed_tokens.weight": 1, "lm_head.weight": 1, "q_proj.weight": 1, "k_proj.weight": 1,
            "v_proj.weight": 1, "gate_proj.weight": 1, "up_proj.weight": 1, "o_proj.weight": 0,
            "down_proj.weight": 0}


def unit_dim(name: str):
    return next((dim for suffix, dim in UNIT_DIM.items() if name.endswith(suffix)), None)


def initial_weights(seed: int = 0) -> dict:
    """HF-layout nGPT weights: matrices on the sphere, scaling vectors away from their init."""
    g = torch.Generator().manual_seed(seed)
    d, ffn, vocab = TINY["hidden_size"], TINY["ffn_hidden_size"], TINY["vocab_size"]
    qd = TINY["num_attention_heads"] * d // TINY["num_attention_heads"]
    kvd = TINY["num_query_groups"] * d // TINY["num_attention_heads"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    def around(value, *shape):
        return value * (1 + 0.3 * torch.rand(*shape, generator=g))

    w = {"model.embed_tokens.weight": rnd(vocab, d), "lm_head.weight": rnd(vocab, d),
         "lm_head.s_z": around(BASE, vocab)}
    for layer in range(TINY["num_layers"]):
        p = f"model.layers.{layer}."
        w.update({p + "self_attn.q_proj.weight": rnd(qd, d), p + "self_attn.k_proj.weight": rnd(kvd, d),
                  p + "self_attn.v_proj.weight": rnd(kvd, d), p + "self_attn.o_proj.weight": rnd(d, qd),
                  p + "mlp.gate_proj.weight": rnd(ffn, d), p + "mlp.up_proj.weight": rnd(ffn, d),
                  p + "mlp.down_proj.weight": rnd(d, ffn), p + "self_attn.s_qk": around(BASE, qd),
                  p + "attn_alpha": around(BASE, d), p + "mlp_alpha": around(BASE, d),
                  p + "mlp.s_u": around(1.0, ffn), p + "mlp.s_v": around(1.0, ffn)})
    return {k: norm(t, unit_dim(k)) if unit_dim(k) is not None else t for k, t in w.items()}


def batches(seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS * MICRO_BATCHES):
        seq = torch.randint(0, TINY["vocab_size"], (1, SEQ + 1), generator=g)
        out.append(dict(tokens=seq[:, :-1], labels=seq[:, 1:], loss_mask=torch.ones(1, SEQ),
                        position_ids=torch.arange(SEQ)[None]))
    return out


# --- one launch: build, check the forward, train, return the weights in HF layout -------------

def _stage(cfg, hf_state):
    model = build_model(cfg, pre_process=parallel_state.is_pipeline_first_stage(),
                        post_process=parallel_state.is_pipeline_last_stage())
    sd = hf_to_megatron(hf_state, cfg, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
                        layer_offset=get_transformer_layer_offset(cfg),
                        num_layers=len(model.decoder.layers),
                        pre_process=model.pre_process, post_process=model.post_process)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)
    return model


def _hf_weights(model, cfg) -> dict:
    """This stage's weights, TP shards joined, in HF layout (every rank of the stage gets them)."""
    shards = [None] * parallel_state.get_tensor_model_parallel_world_size()
    local = {k.removeprefix("module."): v.detach().clone() for k, v in model.state_dict().items()
             if torch.is_tensor(v) and not k.endswith("_extra_state")}
    torch.distributed.all_gather_object(shards, local, group=parallel_state.get_tensor_model_parallel_group())
    return megatron_to_hf(shards, cfg, layer_offset=get_transformer_layer_offset(cfg))


def _logits(model, tokens, hidden: list):
    hooks = [layer.register_forward_hook(lambda _m, _a, out: hidden.append(out[0].detach()))
             for layer in model.module.decoder.layers]  # model: megatron DDP
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    out = get_forward_backward_func()(
        forward_step_func=lambda _it, m: (m(tokens, positions, None), None), data_iterator=iter([None]),
        model=model, num_microbatches=1, seq_length=tokens.size(1), micro_batch_size=tokens.size(0),
        forward_only=True)
    for hook in hooks:
        hook.remove()
    if not parallel_state.is_pipeline_last_stage():
        return None
    return gather_from_tensor_model_parallel_region(out[0])


def run_training(runs: list[dict]) -> list[dict]:
    """Each run: {"sp": bool, "distributed_optimizer": bool, "bucket_size": int (DDP buckets,
    gradient reduction overlapped), "bf16": bool (bf16 model, fp32 main params)}. Returns per run:
    the logits error against the reference, hidden-state norms, losses, the weights after STEPS
    steps (HF layout) and the largest |norm - 1| of the optimizer's fp32 main weight vectors."""
    results = []
    hf0 = initial_weights()
    tokens = torch.stack([b["tokens"][0] for b in batches()[:2]])
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    for run in runs:
        bf16 = run.get("bf16", False)
        cfg = tiny_config(sequence_parallel=run.get("sp", False), bf16=bf16,
                          params_dtype=torch.bfloat16 if bf16 else torch.float32)
        torch.manual_seed(0)
        chunks = build_model_chunks(
            cfg, lambda c, **kw: _stage(c, hf0),
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce="bucket_size" in run, bucket_size=run.get("bucket_size"),
                use_distributed_optimizer=run.get("distributed_optimizer", False)))
        optimizer = build_optimizer(chunks, OptimizerConfig(
            optimizer="adam", lr=0.02, adam_eps=1e-4, weight_decay=0.0, clip_grad=1.0, bf16=bf16, fp16=False,
            use_distributed_optimizer=run.get("distributed_optimizer", False)))
        split = [(s.start, s.end, s.rows, s.cols, s.dim) for s in normalized_slices(optimizer)]
        # forward against the paper's equations
        for chunk in chunks:
            chunk.eval()
        hidden = []
        with torch.no_grad():
            logits = _logits(chunks[0], tokens, hidden)
        hidden_norms = torch.stack([h.norm(dim=-1).flatten() for h in hidden]) if hidden else None
        logits_err = logits_scale = None
        if logits is not None:
            want = reference_logits(hf0, tokens)
            logits_err, logits_scale = (logits - want).abs().max().item(), want.abs().max().item()
        for chunk in chunks:
            chunk.train()
        # train: global batch of MICRO_BATCHES sequences per step, split over data-parallel ranks
        data = batches()
        per_rank = MICRO_BATCHES // dp
        losses = []
        for step in range(STEPS):
            mine = data[step * MICRO_BATCHES:(step + 1) * MICRO_BATCHES][dp_rank * per_rank:(dp_rank + 1) * per_rank]
            result = train_step(chunks, optimizer, iter(mine), cfg, num_microbatches=per_rank,
                                seq_length=SEQ, micro_batch_size=1)
            losses.append(result.loss)
        weights = {}
        for chunk in chunks:
            weights.update({k: v.float() for k, v in _hf_weights(chunk, cfg).items()})
        # the optimizer's fp32 main copies of the listed matrices (shards, with the distributed one)
        sums = torch.cat([s.sum_of_squares() for s in normalized_slices(optimizer)])
        if run.get("distributed_optimizer"):
            torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        results.append(dict(logits_err=logits_err, logits_scale=logits_scale, hidden_norms=hidden_norms, losses=losses,
                            weights=weights, split=split, main_norm_err=(sums.sqrt() - 1).abs().max().item(),
                            normalized=getattr(optimizer, "ngpt_normalized_matrices", 0)))
    return results


# --- tests --------------------------------------------------------------------------------------

def test_normalized_residual_is_the_paper_update():
    cfg = NeonConfig(**TINY)
    module = NormalizedResidual(cfg)
    with torch.no_grad():
        module.alpha.copy_(torch.linspace(-2, 2, TINY["hidden_size"]) * BASE)  # negative: |alpha| used
    h, x = norm(torch.randn(3, 2, TINY["hidden_size"])), torch.randn(3, 2, TINY["hidden_size"])
    alpha = (module.alpha.detach() * 0.05 / BASE).abs()
    expected = (h + alpha * (x / x.norm(dim=-1, keepdim=True) - h))
    expected = expected / expected.norm(dim=-1, keepdim=True)
    got = module(True, False)((x, None), h, 0.0)
    # per side: two normalisations (gamma_d for the norm, 2 roundings for root and division, each)
    # and the update's 3 roundings, all relative to entries of size <= 1
    torch.testing.assert_close(got, expected, rtol=0, atol=2 * (2 * gamma(TINY["hidden_size"]) + 7 * U))
    assert torch.allclose(got.norm(dim=-1), torch.ones(3, 2), atol=SPHERE_TOL)


@pytest.mark.parametrize("dim", [0, 1])
def test_sharded_normalization_equals_whole(dim):
    """A matrix cut into three flat shards at arbitrary points (vectors straddle the cuts):
    summing each shard's partial squares gives the norms of the whole matrix."""
    m = torch.randn(5, 7)
    cuts = [0, 9, 23, 35]
    slices = [_Slice(m.view(-1)[a:b].clone(), 5, 7, dim, m.device, start=a, end=b)
              for a, b in zip(cuts, cuts[1:])]
    sums = sum(s.sum_of_squares() for s in slices)
    for s in slices:
        s.scale_(sums.rsqrt())
    # per side: a sum of at most 7 squares (gamma_7), then root, reciprocal and product (3 roundings);
    # the normalised entries are <= 1
    torch.testing.assert_close(torch.cat([s.main for s in slices]).view(5, 7), norm(m, dim),
                               rtol=0, atol=2 * (gamma(7) + 3 * U))


@pytest.mark.parametrize("bad,setting", [
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(add_bias_linear=True), "add_bias_linear"),
    (dict(gated_linear_unit=False), "gated_linear_unit"),
    (dict(qk_layernorm=True), "qk_layernorm"),
])
def test_config_rejects_what_ngpt_cannot_build(bad, setting):
    with pytest.raises(ConfigError, match=setting):
        NeonConfig(**{**TINY, **bad})


def test_optimizer_defaults_are_the_recipe():
    assert FEATURES["ngpt"].recipe(NeonConfig(**TINY)) == {
        "model": {"ngpt_alpha_sz_scale": "inv_d"},
        "optimizer": {"weight_decay": 0.0, "lr": 1e-2, "min_lr": 1e-3}, "schedule": {"lr_warmup_iters": 0}}


def built_scaling_vectors(scale: str) -> dict:
    """A fresh model's stored alpha_A, s_z and s_qk, and the effective alpha and s_z (one process)."""
    from neon.ngpt import _effective

    cfg = tiny_config(ngpt_alpha_sz_scale=scale)
    params = dict(build_model(cfg).named_parameters())
    alpha, s_z = params["decoder.layers.0.self_attn_bda.alpha"], params["logit_scale.s_z"]
    return {"alpha": alpha.detach(), "s_z": s_z.detach(),
            "s_qk": params["decoder.layers.0.self_attention.core_attention.s_qk"].detach(),
            "alpha_eff": _effective(cfg, "alpha", alpha).detach(), "s_z_eff": _effective(cfg, "s_z", s_z).detach()}


@pytest.mark.parametrize("scale, stored", [("inv_sqrt_d", BASE), ("inv_d", 1 / TINY["hidden_size"])])
def test_alpha_and_s_z_are_stored_at_their_scale_and_used_at_their_init(scale, stored):
    """alpha, s_z stored at 1/sqrt(d) (the default) or 1/d (the recipe), used as stored * init / scale:
    a freshly built model's effective alpha is 0.05 and s_z is 1 either way; s_qk stays at 1/sqrt(d)."""
    got = run_distributed(built_scaling_vectors, 1, kwargs={"scale": scale})[0]
    assert torch.all(got["alpha"] == torch.tensor(stored, dtype=torch.float32))
    assert torch.all(got["s_z"] == torch.tensor(stored, dtype=torch.float32))
    assert torch.all(got["s_qk"] == torch.tensor(BASE, dtype=torch.float32))
    # one fp32 rounding of the stored value and one of init / scale and of the product
    assert torch.allclose(got["alpha_eff"], torch.tensor(0.05), rtol=3 * U, atol=0)
    assert torch.allclose(got["s_z_eff"], torch.tensor(1.0), rtol=3 * U, atol=0)


def test_ngpt_init_std_is_one_over_sqrt_d_model():
    cfg = NeonConfig(**TINY)
    assert cfg.init_method_std == pytest.approx(BASE)


@pytest.fixture(scope="module")
def single_runs():
    return run_distributed(run_training, 1, kwargs={"runs": [{}, {"bf16": True}]})[0]


@pytest.fixture(scope="module")
def single(single_runs):
    return single_runs[0]


def test_forward_matches_the_equations_and_stays_on_the_sphere(single):
    bound = logits_bound(NeonConfig(**TINY), SEQ, single["logits_scale"])
    assert single["logits_err"] <= bound, (single["logits_err"], bound)
    norms = single["hidden_norms"]
    assert norms.shape[0] == TINY["num_layers"]
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=SPHERE_TOL)


def test_every_listed_weight_vector_has_unit_norm_after_training(single):
    w, start = single["weights"], initial_weights()
    checked = 0
    for name, t in w.items():
        dim = unit_dim(name)
        if dim is not None:
            torch.testing.assert_close(t.norm(dim=dim), torch.ones(t.size(1 - dim)), rtol=0, atol=SPHERE_TOL,
                                       msg=f"{name} off the sphere")
            checked += 1
            assert not torch.allclose(t, start[name]), f"{name} did not train"
    assert checked == 2 + 7 * TINY["num_layers"]
    for name in ("lm_head.s_z", "model.layers.0.attn_alpha", "model.layers.1.mlp.s_v",
                 "model.layers.0.self_attn.s_qk"):
        assert not torch.allclose(w[name], start[name]), f"{name} did not train"


def test_bf16_model_keeps_fp32_main_weights_on_the_sphere(single_runs):
    bf16 = single_runs[1]
    assert bf16["main_norm_err"] <= SPHERE_TOL and single_runs[0]["main_norm_err"] <= SPHERE_TOL
    for name, t in bf16["weights"].items():  # the bf16 model copies: rounded unit vectors
        if unit_dim(name) is not None:
            torch.testing.assert_close(t.norm(dim=unit_dim(name)), torch.ones(t.size(1 - unit_dim(name))),
                                       rtol=0, atol=BF16_SPHERE_TOL, msg=name)


def _assert_same_training(single, results, label):
    merged = {}
    for r in results:
        merged.update(r["weights"])
    assert set(merged) == set(single["weights"]), label
    for name, t in single["weights"].items():
        torch.testing.assert_close(merged[name], t, rtol=0, atol=2e-6, msg=f"{label}: {name}")
    losses = [r["losses"] for r in results if r["losses"][0] is not None][-1]
    assert losses == pytest.approx(single["losses"], abs=1e-5), label


def test_data_parallel_ddp_and_distributed_optimizer_match_one_process(single, single_runs):
    ddp, dist_opt, dist_bf16 = zip(*run_distributed(run_training, 2, kwargs={
        "runs": [{}, {"distributed_optimizer": True, "bucket_size": 3000},
                 {"distributed_optimizer": True, "bucket_size": 3000, "bf16": True}]}))
    _assert_same_training(single, ddp, "DP2 DDP")
    _assert_same_training(single, dist_opt, "DP2 distributed optimizer")
    # the distributed optimizer really cut rows of d_model-space matrices between the two ranks
    cut_rows = [(start, rows, cols) for r in dist_opt for start, end, rows, cols, dim in r["split"]
                if dim == 1 and 0 < start < rows * cols and start % cols]
    assert cut_rows, "no weight vector straddles two shards: the test would not see the all-reduce"
    assert all(r["normalized"] > 0 for r in dist_opt)
    # bf16 model, fp32 main shards: the all-reduced norms of the main vectors are exactly 1
    assert max(r["main_norm_err"] for r in dist_opt + dist_bf16) <= SPHERE_TOL
    bf16_losses = [x for x in dist_bf16[0]["losses"]]
    assert bf16_losses == pytest.approx(single_runs[1]["losses"], abs=2e-2), (bf16_losses, single_runs[1]["losses"])


@pytest.mark.parametrize("layout", ["tp2-sp", "pp2"])
def test_model_parallel_matches_one_process(single, layout):
    kwargs = {"tp": 2} if layout == "tp2-sp" else {"pp": 2}
    results = run_distributed(run_training, 2, **kwargs,
                              kwargs={"runs": [{"sp": layout == "tp2-sp"}]})
    results = [r[0] for r in results]
    errs = [(r["logits_err"], logits_bound(NeonConfig(**TINY), SEQ, r["logits_scale"]))
            for r in results if r["logits_err"] is not None]
    assert errs and all(err <= bound for err, bound in errs), errs
    for r in results:
        if r["hidden_norms"] is not None:
            torch.testing.assert_close(r["hidden_norms"], torch.ones_like(r["hidden_norms"]),
                                       rtol=0, atol=SPHERE_TOL)
    _assert_same_training(single, results, layout)


def test_pretrain_config_applies_ngpt_defaults_and_flags_override_them():
    from neon.training.config import resolve

    common = ["--data-path", "x", "--tokenizer-model", "t", "--vocab-size", "128", "--num-layers", "2",
              "--hidden-size", "32", "--num-attention-heads", "4", "--weight-decay", "0.1"]
    plain = resolve(common[:-2] + ["--lr-warmup-iters", "5"], world_size=1, check_files=False)
    assert (plain.optimizer.weight_decay, plain.schedule.lr_warmup_iters) == (0.1, 5)
    ngpt = resolve(common[:-2] + ["--ngpt"], world_size=1, check_files=False)
    assert (ngpt.optimizer.weight_decay, ngpt.schedule.lr_warmup_iters) == (0.0, 0)
    chosen = resolve(common + ["--ngpt", "--lr-warmup-iters", "7"], world_size=1, check_files=False)
    assert (chosen.optimizer.weight_decay, chosen.schedule.lr_warmup_iters) == (0.1, 7)


def test_hf_reference_is_the_equations():
    """The HF reference (neon/hf) against the plain forward above, on the same weights."""
    from neon.hf.modeling_neon import NeonForCausalLM
    from neon.state_dict_adapter import neon_hf_config

    hf = NeonForCausalLM(neon_hf_config(NeonConfig(**TINY))).eval()
    weights = initial_weights()
    hf.load_state_dict(weights, strict=True)
    tokens = torch.randint(0, TINY["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = hf(tokens).logits, reference_logits(weights, tokens)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=logits_bound(NeonConfig(**TINY), SEQ, want.abs().max().item()))
