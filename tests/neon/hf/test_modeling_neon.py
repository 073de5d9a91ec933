"""The Hugging Face reference NeonForCausalLM: with every feature off it is transformers'
MistralForCausalLM; its KV cache gives what a full forward gives; a saved model loads back
through AutoModelForCausalLM with trust_remote_code."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from neon.hf.configuration_neon import NeonHFConfig
from neon.hf.modeling_neon import NeonForCausalLM

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=4, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5,
            rope_theta=10000.0, sliding_window=6, initializer_range=0.1, eos_token_id=None,
            bos_token_id=None, pad_token_id=None)
# Cached decoding computes the same function with other GEMM shapes (one new row against the
# cache instead of the whole sequence), so only the order of fp32 additions differs. R = 3 layers
# x 6 reductions + the head, each of at most n = 96 terms: a reordered sum of n terms moves by at
# most n * 2^-24 of its terms' magnitude (Higham's gamma_n), so R * n * 2^-24 = 1.1e-4 of the
# logits' scale bounds the difference in the worst case (nGPT's norms and scales carry it through
# relative to that scale). A wrong cache (a dropped or extra key) moves logits by ~1e-1.
CACHE_ROUNDING = (3 * 6 + 1) * 96 * 2.0 ** -24
FEATURES = {"base": {}, "diff-matched": {"diff_attention": "matched"},
            "diff-expressive": {"diff_attention": "expressive"}, "diff-v2": {"diff_attention": "v2", "seed": 2},
            "ngpt": {"ngpt": True},
            "diff-ngpt": {"diff_attention": "matched", "ngpt": True}}
# (diff-v2 seed 2: its greedy choices at seed 0 win by less than 10x the cache bound)


def tiny(seed=0, **features) -> NeonForCausalLM:
    torch.manual_seed(seed)
    model = NeonForCausalLM(NeonHFConfig(**TINY, **features)).eval()
    if features.get("ngpt"):  # at init (alpha 0.05, s_z 1) nGPT barely moves h: greedy output repeats
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("alpha") or name.endswith("s_z"):
                    p.mul_(torch.empty_like(p).uniform_(5.0, 15.0))
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_base_is_mistral(tie):
    torch.manual_seed(0)
    cfg = MistralConfig(**TINY, tie_word_embeddings=tie)
    cfg._attn_implementation = "eager"
    mistral = MistralForCausalLM(cfg).eval()
    neon = NeonForCausalLM(NeonHFConfig(**TINY, tie_word_embeddings=tie)).eval()
    assert set(neon.state_dict()) == set(mistral.state_dict())
    neon.load_state_dict(mistral.state_dict(), strict=True)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = mistral(tokens).logits, neon(tokens).logits
    assert want.abs().max() > 0.1
    # the same torch ops in the same order and shapes as Mistral's eager path: equal bit for bit
    # on any machine (a kernel's result depends on the machine, not on which module calls it)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("features", list(FEATURES))
def test_cache_matches_full_forward(features):
    model = tiny(**FEATURES[features])
    prompt = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(2))
    # 10 new tokens with a window of 6: the sliding-window cache drops old keys on the way
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
        assert cached.shape == (2, 19)
        assert torch.equal(cached, uncached), features
        assert len(set(cached[:, 9:].flatten().tolist())) > 3, "degenerate generation"
        # logits step by step through the cache equal one forward over the whole sequence
        full = model(cached).logits
        out = model(cached[:, :9], use_cache=True)
        steps, cache = [out.logits], out.cache
        for i in range(9, 19):
            out = model(cached[:, i:i + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
    bound = CACHE_ROUNDING * full.abs().max().item()
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=bound)
    # every greedy choice wins by far more than that bound, so it is the same on every machine
    top2 = full[:, 8:18].topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 10 * bound, features


@pytest.mark.parametrize("features", ["diff-matched", "diff-expressive", "diff-v2"])
def test_diff_changes_the_model(features):
    """Matched keeps Mistral's parameter count; expressive doubles Q and K; v2 doubles Q and adds
    W_lambda [H, D]."""
    n_params = sum(p.numel() for p in tiny(**FEATURES[features]).parameters())
    base = sum(p.numel() for p in tiny().parameters())
    d, layers, D = TINY["head_dim"], TINY["num_hidden_layers"], TINY["hidden_size"]
    extra = layers * (4 * d + (2 * d if features == "diff-matched" else d))  # lambdas + head norm
    if features == "diff-v2":  # H more query heads of width d, and W_lambda
        extra = layers * TINY["num_attention_heads"] * D * (d + 1)
    if features == "diff-expressive":
        extra += layers * D * d * (TINY["num_attention_heads"] + TINY["num_key_value_heads"])
    assert n_params == base + extra


def test_saved_model_loads_with_auto_classes(tmp_path):
    model = tiny(diff_attention="matched")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_neon.py").exists() and (tmp_path / "configuration_neon.py").exists()
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert config.model_type == "neon" and config.diff_attention == "matched"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "NeonForCausalLM"
    tokens = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)
