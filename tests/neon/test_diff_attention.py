"""DiffAttention: the equations on tiny inputs (independent of both implementations), then the
megatron model against the Hugging Face reference (logits, weight mapping, one training step)
at TP=1, TP=2 (with and without sequence parallelism) and PP=2 in real gloo processes."""

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from neon.config import NeonConfig
from neon.diff_attention import DiffCoreAttention, lambda_init_for_layer
from neon.errors import ConfigError
from neon.hf.modeling_neon import NeonAttention, NeonForCausalLM
from neon.hf.modeling_neon import lambda_init_for_layer as hf_lambda_init
from neon.state_dict_adapter import neon_hf_config
from tests.dist import run_distributed
from tests.parity import assert_matches, check_against_reference, parallel_config, tp_gather

# 8 query heads, 4 key/value heads: 'matched' has 4 differential heads over 2 key/value heads
TINY = dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=4,
            ffn_hidden_size=96, vocab_size=128, max_position_embeddings=64, sliding_window=5)
BATCH, SEQ = 2, 16
# Adam's first step is lr * g / (|g| + eps): a large eps limits how much it amplifies rounding-level
# gradient differences (the bound in tests/parity.py).
ADAM = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1)


# --- the equations, written out with explicit loops -------------------------------------------

def explicit_softmax_map(q, k, scale, window):
    """A[i, j] = exp(q_i.k_j scale) / sum_{j' visible} exp(q_i.k_j' scale) over visible j."""
    s, q, k = q.size(0), q.detach(), k.detach()
    a = torch.zeros(s, s, dtype=torch.float64)
    for i in range(s):
        visible = [j for j in range(s) if j <= i and (window is None or j > i - window)]
        logits = torch.tensor([float(q[i] @ k[j]) * scale for j in visible], dtype=torch.float64)
        a[i, visible] = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
    return a


def explicit_diff_head(q1, q2, k1, k2, v, lam, lambda_init, norm_w, window):
    """(1 - lambda_init) RMSNorm((A1 - lambda A2) V) for one head; all inputs [s, .]."""
    scale = 1.0 / math.sqrt(q1.size(-1))
    a1 = explicit_softmax_map(q1.double(), k1.double(), scale, window)
    a2 = explicit_softmax_map(q2.double(), k2.double(), scale, window)
    o = (a1 - lam * a2) @ v.double()
    o = o / torch.sqrt((o ** 2).mean(-1, keepdim=True) + 1e-5) * norm_w.double()
    return (1.0 - lambda_init) * o


def explicit_lambda(lq1, lk1, lq2, lk2, lambda_init):
    def dot(a, b):
        return sum(float(x) * float(y) for x, y in zip(a.detach(), b.detach()))

    return math.exp(dot(lq1, lk1)) - math.exp(dot(lq2, lk2)) + lambda_init


def test_lambda_init_per_layer():
    for fn in (lambda_init_for_layer, hf_lambda_init):
        assert fn(1) == pytest.approx(0.2)
        assert fn(2) == pytest.approx(0.8 - 0.6 * math.exp(-0.3))
        assert fn(40) == pytest.approx(0.8, abs=1e-5)
        assert fn(3, 0.5) == 0.5
    # the megatron layer reads the global 1-based layer number; the HF layer its 0-based index
    cfg = NeonConfig(**TINY, diff_attention="matched")
    assert DiffCoreAttention(cfg, 1, AttnMaskType.causal, "self").lambda_init == pytest.approx(0.2)
    hf_cfg = neon_hf_config(cfg)
    assert NeonAttention(hf_cfg, 0).lambda_init == pytest.approx(0.2)
    assert NeonAttention(hf_cfg, 2).lambda_init == pytest.approx(fn(3))
    const = NeonConfig(**TINY, diff_attention="expressive", diff_lambda_init=0.8)
    assert DiffCoreAttention(const, 1, AttnMaskType.causal, "self").lambda_init == 0.8


@pytest.mark.parametrize("mode", ["matched", "expressive"])
def test_differential_map_equals_two_softmaxes(mode):
    """Both implementations' attention cores against the loops above (GQA, sliding window)."""
    torch.manual_seed(0)
    cfg = NeonConfig(**TINY, diff_attention=mode)
    s, window = 7, 5
    # megatron core: inputs as DiffSelfAttention hands them over (after RoPE)
    core = DiffCoreAttention(cfg, 2, AttnMaskType.causal, "self").double()
    with torch.no_grad():
        for p in (core.lambda_q1, core.lambda_k1, core.lambda_q2, core.lambda_k2):
            p.normal_(0, 0.5)
        core.subln.weight.uniform_(0.5, 1.5)
    n, g = core.layout.heads, core.layout.groups
    d, dv = core.layout.qk_dim, core.layout.v_dim
    query = torch.randn(s, 1, 2 * n, d, dtype=torch.float64)
    key = torch.randn(s, 1, 2 * g, d, dtype=torch.float64)
    value = torch.randn(s, 1, g, dv, dtype=torch.float64)
    out = core(query, key, value).view(s, n, dv)
    lam = explicit_lambda(core.lambda_q1, core.lambda_k1, core.lambda_q2, core.lambda_k2, core.lambda_init)
    assert abs(lam - core.lambda_init) > 0.05, "lambda barely differs from lambda_init: weak test"
    for h in range(n):
        grp = h // (n // g)
        want = explicit_diff_head(query[:, 0, 2 * h], query[:, 0, 2 * h + 1], key[:, 0, 2 * grp],
                                  key[:, 0, 2 * grp + 1], value[:, 0, grp], lam, core.lambda_init,
                                  core.subln.weight.detach(), window)
        torch.testing.assert_close(out[:, h].detach(), want, rtol=1e-9, atol=1e-9)

    # the two-call path for GPUs (halves of V, flash-compatible widths) gives the same maps
    q4, k4 = (t.view(s, 1, -1, 2, d).transpose(2, 3).reshape(s, 1, -1, d).permute(1, 2, 0, 3) for t in (query, key))
    v4 = torch.cat([value, value], dim=2).permute(1, 2, 0, 3)
    torch.testing.assert_close(core.local_maps(q4, k4, v4, split_values=True),
                               core.local_maps(q4, k4, v4, split_values=False), rtol=1e-12, atol=1e-12)

    # HF reference: no rotation (cos 1, sin 0), so q/k/v are the projections themselves
    attn = NeonAttention(neon_hf_config(cfg, initializer_range=0.2), layer_idx=1).double()
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            lin.weight.normal_(0, 0.2)
        for p in (attn.lambda_q1, attn.lambda_k1, attn.lambda_q2, attn.lambda_k2):
            p.normal_(0, 0.5)
    x = torch.randn(1, s, cfg.hidden_size, dtype=torch.float64)
    cos, sin = torch.ones(1, s, d, dtype=torch.float64), torch.zeros(1, s, d, dtype=torch.float64)
    got = attn(x, cos, sin, None)
    q = attn.q_proj(x)[0].view(s, n, 2, d)
    k = attn.k_proj(x)[0].view(s, g, 2, d)
    v = attn.v_proj(x)[0].view(s, g, dv)
    lam = explicit_lambda(attn.lambda_q1, attn.lambda_k1, attn.lambda_q2, attn.lambda_k2, attn.lambda_init)
    heads = [explicit_diff_head(q[:, h, 0], q[:, h, 1], k[:, h // (n // g), 0], k[:, h // (n // g), 1],
                                v[:, h // (n // g)], lam, attn.lambda_init, attn.subln.weight.detach(), window)
             for h in range(n)]
    want = attn.o_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(got[0].detach(), want.detach(), rtol=1e-9, atol=1e-9)


ODD_GROUPS = {"num_attention_heads": 6, "num_query_groups": 3, "kv_channels": 8}


def test_config_rejects_unbuildable_layouts():
    with pytest.raises(ConfigError, match="num_query_groups=3.*even"):
        NeonConfig(**{**TINY, **ODD_GROUPS}, diff_attention="matched")
    with pytest.raises(ConfigError, match="diff_attention='bogus'"):
        NeonConfig(**TINY, diff_attention="bogus")
    with pytest.raises(ConfigError, match="diff_lambda_init=1.5"):
        NeonConfig(**TINY, diff_attention="matched", diff_lambda_init=1.5)
    # 3 key/value heads: fine for 'expressive' (no pairing)
    NeonConfig(**{**TINY, **ODD_GROUPS}, diff_attention="expressive")


# --- megatron vs the Hugging Face reference, in real processes ---------------------------------

def diff_config(mode: str, sequence_parallel: bool = False) -> NeonConfig:
    return parallel_config(**TINY, diff_attention=mode, sequence_parallel=sequence_parallel)


def reference_model(cfg: NeonConfig, seed: int = 0) -> NeonForCausalLM:
    torch.manual_seed(seed)
    hf = NeonForCausalLM(neon_hf_config(cfg, initializer_range=0.1))
    with torch.no_grad():  # lambdas further from lambda_init than the N(0, 0.1) init gives
        for layer in hf.model.layers:
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                getattr(layer.self_attn, name).normal_(0, 0.4)
            layer.self_attn.subln.weight.uniform_(0.5, 1.5)
    return hf


def diff_probe(chunks, drawn: dict) -> dict:
    """The replicated lambda vectors were drawn identically on the ranks of a TP group; the
    layers' lambda_init follow their global layer numbers."""
    lam_drawn = [v for k, v in drawn.items() if "lambda_q1" in k][0]
    layers = chunks[0].module.decoder.layers
    return dict(same_init=all(torch.equal(t, lam_drawn) for t in tp_gather(lam_drawn)),
                lambda_inits=[layer.self_attention.core_attention.lambda_init for layer in layers])


def check_diff_against_reference(cases):
    """For each (mode, sequence_parallel): logits, mapping round trip, one AdamW step."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=gen)
    results = []
    for mode, sp in cases:
        cfg = diff_config(mode, sp)
        results.append(check_against_reference(cfg, reference_model(cfg), tokens, labels, ADAM, probe=diff_probe))
    return results


LAYOUTS = {
    "tp1": (1, {}, [("matched", False), ("expressive", False)]),
    "tp2": (2, {"tp": 2}, [("matched", True), ("expressive", True), ("matched", False), ("expressive", False)]),
    "pp2": (2, {"pp": 2}, [("matched", False), ("expressive", False)]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_diff_matches_reference(layout):
    world, parallel, cases = LAYOUTS[layout]
    ranks = run_distributed(check_diff_against_reference, world, **parallel, kwargs={"cases": cases},
                            timeout=400)
    for i, (mode, sp) in enumerate(cases):
        per_rank = [r[i] for r in ranks]
        what = f"{layout} {mode} sp={sp}"
        # logits, round trip, loss and weights after one step within tests/parity.py's bounds;
        # every tensor moved by about lr (the step mattered)
        assert_matches(per_rank, what, min_moved=1e-4)
        assert all(r["same_init"] for r in per_rank), f"{what}: TP ranks drew different lambda vectors"
        lambda_moved = min(v for r in per_rank for k, v in r["moved"].items() if "lambda" in k)
        assert lambda_moved > 1e-3, (what, lambda_moved)
        if layout == "pp2":  # stage 2 holds global layers 3 and 4
            inits = per_rank[0]["lambda_inits"] + per_rank[1]["lambda_inits"]
        else:
            inits = per_rank[0]["lambda_inits"]
        assert inits == pytest.approx([lambda_init_for_layer(layer) for layer in range(1, 5)]), (what, inits)
