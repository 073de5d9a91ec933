"""DiffAttention V2: the equations on tiny inputs (explicit loops, independent of both
implementations), the config's errors, then the megatron model against the Hugging Face reference
(logits, weight mapping, one training step) at TP=1, TP=2 (with and without sequence parallelism)
and PP=2 in real gloo processes."""

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from neon.config import NeonConfig
from neon.diff_attention_v2 import DiffV2CoreAttention
from neon.errors import ConfigError
from neon.hf.configuration_neon import NeonHFConfig
from neon.hf.modeling_neon import NeonAttention, NeonForCausalLM
from neon.state_dict_adapter import neon_hf_config
from tests.dist import run_distributed
from tests.neon.test_diff_attention import ADAM, BATCH, SEQ, TINY, explicit_softmax_map
from tests.parity import assert_matches, check_against_reference, parallel_config

# TINY: 8 heads over 4 key/value heads (r = 2: query heads 0-3 read key/value head 0, ...), window 5


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def explicit_v2_head(q_pos, q_neg, k, v, logits, window):
    """A_pos V - sigmoid(logit_i) A_neg V for one head, row by row; inputs [s, .], logits [s]."""
    scale = 1.0 / math.sqrt(q_pos.size(-1))
    a_pos = explicit_softmax_map(q_pos.double(), k.double(), scale, window) @ v.double()
    a_neg = explicit_softmax_map(q_neg.double(), k.double(), scale, window) @ v.double()
    lam = torch.tensor([sigmoid(float(x)) for x in logits.detach()], dtype=torch.float64)[:, None]
    return a_pos - lam * a_neg


def test_megatron_core_equals_the_equations():
    """DiffV2CoreAttention on inputs as DiffV2SelfAttention hands them over (after RoPE)."""
    torch.manual_seed(0)
    cfg = NeonConfig(**TINY, diff_attention="v2")
    core = DiffV2CoreAttention(cfg, 2, AttnMaskType.causal, "self").double()
    s, n, g, d = 7, cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    r = n // g
    query = torch.randn(s, 1, 2 * n, d, dtype=torch.float64)
    key = torch.randn(s, 1, g, d, dtype=torch.float64)
    value = torch.randn(s, 1, g, d, dtype=torch.float64)
    logits = 2 * torch.randn(s, 1, n, dtype=torch.float64)  # head h's logit: group h // r, slot h % r
    out = core(query, key, torch.cat([value, logits.view(s, 1, g, r)], dim=-1)).view(s, n, d)
    for h in range(n):
        grp = (2 * h) // (2 * r)  # query head j reads key/value head j // (2 r); 2h and 2h + 1 share it
        assert grp == (2 * h + 1) // (2 * r)
        want = explicit_v2_head(query[:, 0, 2 * h], query[:, 0, 2 * h + 1], key[:, 0, grp], value[:, 0, grp],
                                logits[:, 0, h], TINY["sliding_window"])
        torch.testing.assert_close(out[:, h], want, rtol=1e-9, atol=1e-9)


def test_hf_attention_equals_the_equations():
    """The HF reference's V2 attention: no rotation (cos 1, sin 0), so q/k/v are the projections."""
    torch.manual_seed(1)
    cfg = NeonConfig(**TINY, diff_attention="v2")
    attn = NeonAttention(neon_hf_config(cfg), layer_idx=1).double()
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, attn.lambda_proj):
            lin.weight.normal_(0, 0.2)
    s, n, g, d, D = 7, cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim, cfg.hidden_size
    assert attn.q_proj.weight.shape == (2 * n * d, D) and attn.lambda_proj.weight.shape == (n, D)
    assert not hasattr(attn, "subln") and not hasattr(attn, "lambda_q1")  # no head norm, no V1 lambda
    x = torch.randn(1, s, D, dtype=torch.float64)
    cos, sin = torch.ones(1, s, d, dtype=torch.float64), torch.zeros(1, s, d, dtype=torch.float64)
    got = attn(x, cos, sin, None)[0]
    q, k, v = (p(x)[0].view(s, -1, d) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    logits = attn.lambda_proj(x)[0]  # [s, n]
    assert logits.std() > 0.5, "lambdas barely differ from 1/2: weak test"
    r = n // g
    heads = [explicit_v2_head(q[:, 2 * h], q[:, 2 * h + 1], k[:, h // r], v[:, h // r], logits[:, h],
                              TINY["sliding_window"]) for h in range(n)]
    want = attn.o_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-9, atol=1e-9)


def test_config_rejects_what_v2_cannot_build():
    with pytest.raises(ConfigError, match="diff_lambda_init=0.5.*no meaning.*'v2'"):
        NeonConfig(**TINY, diff_attention="v2", diff_lambda_init=0.5)
    with pytest.raises(ConfigError, match="ngpt=True.*'v2'"):
        NeonConfig(**TINY, diff_attention="v2", ngpt=True)
    with pytest.raises(ConfigError, match="'v2'"):  # the error lists the layouts, v2 among them
        NeonConfig(**TINY, diff_attention="v3")
    with pytest.raises(ValueError, match="v2.*ngpt"):
        NeonHFConfig(diff_attention="v2", ngpt=True)
    # odd key/value head counts are fine (no pairing of key/value heads)
    NeonConfig(**{**TINY, "num_attention_heads": 6, "num_query_groups": 3, "kv_channels": 8}, diff_attention="v2")


# --- megatron vs the Hugging Face reference, in real processes ---------------------------------

def check_v2_against_reference(sequence_parallel: list[bool]):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=gen)
    results = []
    for sp in sequence_parallel:
        cfg = parallel_config(**TINY, diff_attention="v2", sequence_parallel=sp)
        torch.manual_seed(0)
        hf = NeonForCausalLM(neon_hf_config(cfg, initializer_range=0.1))
        results.append(check_against_reference(cfg, hf, tokens, labels, ADAM))
    return results


LAYOUTS = {"tp1": (1, {}, [False]), "tp2": (2, {"tp": 2}, [True, False]), "pp2": (2, {"pp": 2}, [False])}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_v2_matches_reference(layout):
    world, parallel, cases = LAYOUTS[layout]
    ranks = run_distributed(check_v2_against_reference, world, **parallel, kwargs={"sequence_parallel": cases},
                            timeout=400)
    for i, sp in enumerate(cases):
        per_rank = [r[i] for r in ranks]
        what = f"{layout} v2 sp={sp}"
        # logits, round trip, loss and weights after one step within tests/parity.py's bounds;
        # every tensor (W_lambda included) moved by about lr
        assert_matches(per_rank, what, min_moved=1e-4)
        names = {n for r in per_rank for n in r["names"]}
        assert sum("lambda_proj" in n for n in names) == TINY["num_layers"], (what, sorted(names))
