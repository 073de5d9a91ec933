"""DiffAttention (neon/diff_attention.py, neon/diff_attention_v2.py) under the feature contract.

Its modules import neon.config, which registers this feature: the hooks import them on use."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Literal, Optional

from neon.features.base import Feature, choices


@dataclass
class DiffAttentionSettings:
    diff_attention: Literal["off", "matched", "expressive", "v2"] = "off"
    """DiffAttention layout, one of 'off', 'matched', 'expressive', 'v2': 'matched' keeps the
    Mistral parameter count, 'expressive' doubles Q/K, 'v2' (DiffAttention V2) doubles the query
    heads over the same key/value heads (docs/diff_attention.md)."""
    diff_lambda_init: Optional[float] = None
    """A constant lambda_init; None uses 0.8 - 0.6 * exp(-0.3 * (l - 1)) for 1-based layer l."""


MODES = choices(DiffAttentionSettings, "diff_attention")


class DiffAttentionFeature(Feature):
    name = "diff_attention"
    settings = DiffAttentionSettings
    hf_fields = ("diff_attention", "diff_lambda_init")
    hf_reference = ("NeonAttention.diff_lambda", "NeonAttention.diff_v2", "NeonAttention.forward")
    ablation_name = "diff"
    ablation_settings = {"diff_attention": "matched"}

    def validate(self, config, fail) -> None:
        heads = config.num_attention_heads
        groups = config.num_query_groups or heads
        tp = config.tensor_model_parallel_size
        head_dim = config.kv_channels or config.hidden_size // heads
        mode = config.diff_attention
        if mode not in MODES:
            fail("diff_attention", mode, "is not a DiffAttention layout", f"use one of {MODES}")
        if mode == "matched" and heads % 2:
            fail("num_attention_heads", heads, "must be even for diff_attention='matched' "
                 "(two query heads form one differential head)", "use an even number of heads")
        if mode == "matched" and groups % 2:
            fail("num_query_groups", groups, "must be even for diff_attention='matched' (two "
                 "key/value heads form one differential key/value head: K1, K2 and V of width 2d)",
                 "use an even number of key/value heads, or diff_attention='expressive'")
        if mode == "matched" and (groups // 2) % tp:
            fail("num_query_groups", groups, f"gives {groups // 2} differential key/value heads, not "
                 f"divisible by tensor_model_parallel_size={tp}",
                 "use 2 * tp * k key/value heads, or diff_attention='expressive'")
        if mode == "v2":
            self.validate_v2(config, fail)
        if config.diff_lambda_init is not None and not 0.0 <= config.diff_lambda_init < 1.0:
            fail("diff_lambda_init", config.diff_lambda_init, "must lie in [0, 1) (heads are scaled "
                 "by 1 - lambda_init)", "use e.g. 0.8 or 0.5, or None for the per-layer schedule")
        if mode != "off" and head_dim % 2:
            fail("kv_channels", head_dim, "must be even for rotary embeddings with DiffAttention",
                 "use an even head size")

    @staticmethod
    def validate_v2(config, fail) -> None:
        """What the 'v2' layout has no place for: lambda_init."""
        if config.diff_lambda_init is not None:
            fail("diff_lambda_init", config.diff_lambda_init, "has no meaning for diff_attention='v2' "
                 "(lambda = sigmoid(W_lambda x) per token and head; there is no lambda_init)",
                 "leave diff_lambda_init unset, or use diff_attention='matched' or 'expressive'")

    def lacks(self, config):
        if config.diff_attention == "v2":
            return {"unit_sphere": "the unit-sphere form of its doubled query heads and W_lambda is not built; "
                                   "'matched' and 'expressive' have it"}
        return {}

    def layer_spec(self, spec, config, use_te):
        from neon.diff_attention import DiffCoreAttention, DiffSelfAttention
        from neon.diff_attention_v2 import DiffV2CoreAttention, DiffV2SelfAttention

        v2 = config.diff_attention == "v2"
        attn = spec.submodules.self_attention
        attn = replace(attn, module=DiffV2SelfAttention if v2 else DiffSelfAttention, submodules=replace(
            attn.submodules, core_attention=partial(DiffV2CoreAttention if v2 else DiffCoreAttention,
                                                    use_te=use_te)))
        return replace(spec, submodules=replace(spec.submodules, self_attention=attn))

    def hf_layer_tensors(self, config):
        if config.diff_attention == "v2":  # W_lambda [H, hidden], rows split with the heads
            return [("self_attn.lambda_proj.weight", "self_attention.linear_lambda.weight", 0)]
        # the lambda vectors and the per-head norm scale, replicated over TP
        return [(f"self_attn.{name}", f"self_attention.core_attention.{name}", None)
                for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "subln.weight")]

    def qkv_split(self, config):
        from neon.diff_attention import diff_layout
        from neon.diff_attention_v2 import diff_v2_layout

        if config.diff_attention == "v2":  # [Q of the group's 2r query heads] [K] [V]
            lay = diff_v2_layout(config)
            return lay.groups, [2 * lay.heads_per_group * lay.head_dim, lay.head_dim, lay.head_dim]
        lay = diff_layout(config)  # [Q1; Q2 of each head of the group] [K1; K2] [V]
        return lay.groups, [lay.heads // lay.groups * 2 * lay.qk_dim, 2 * lay.qk_dim, lay.v_dim]

    def flops_terms(self, config, keys, terms):
        """Both maps: 2 n heads of Q K^T (width d) and A V (width d_v) over `keys` keys, with the
        layout's projections; 'v2' also W_lambda (d_model -> H). The lambdas of 'matched' and
        'expressive' are four d-vectors per layer, not per token: no term."""
        from neon.diff_attention import diff_layout

        h = config.hidden_size
        if config.diff_attention == "v2":
            # 2H query heads of head_dim over the H_kv key/value heads; out W_o: H * head_dim -> h
            heads, d = config.num_attention_heads, config.head_dim
            groups = config.num_query_groups or heads
            proj = h * (2 * heads * d + 2 * groups * d) + heads * d * h + h * heads
            return {**terms, "attn_proj": proj, "attn_scores": keys * 2 * heads * 2 * d}
        lay = diff_layout(config)
        return {**terms, "attn_proj": h * lay.qkv_rows + lay.out_width * h,
                "attn_scores": keys * 2 * lay.heads * (lay.qk_dim + lay.v_dim)}
