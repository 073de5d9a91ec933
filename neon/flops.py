"""Model FLOPs per trained token: Neon's one count, used by the console MFU, metrics.jsonl and
every benchmark (tools/benchmark_*.py). docs/training.md ("How MFU is counted") has the formula
per variant and the sources of the two conventions.

Matmuls only, 2 FLOPs per multiply-add, forward + backward = 3 x forward (4 x with full
recomputation, as Megatron-LM counts it). Norms, softmax, RoPE and elementwise scalings are left
out, as every MFU anchor leaves them out.

Causal attention has two conventions (`CAUSAL`):
- "half": a query attends to the keys before it, on average s/2 of s (Megatron-LM's
  `num_floating_point_operations`, "causal mask (only half of the mask is non-zero)");
- "full": every query against every key of the sequence, s (torchtitan's
  `get_num_flop_per_token`: "we follow the convention and do not account for sparsity in causal
  attention"; PaLM's appendix B formula 6 N + 12 L H Q T).
With a sliding window w < s the keys are min(t, w) for the query at position t: on average
w - w^2 / (2 s) ("half", which is s/2 at w = s) or w ("full").
"""

from __future__ import annotations

from neon.config import NeonConfig

CAUSAL = ("half", "full")


def attention_keys(seq_length: int, window, causal: str = "half") -> float:
    """Keys one query attends to, averaged over the sequence, under the `causal` convention."""
    if causal not in CAUSAL:
        raise ValueError(f"causal={causal!r}: the causal-attention convention is one of {CAUSAL}")
    w = min(seq_length, window or seq_length)
    return float(w) if causal == "full" else w - w * w / (2.0 * seq_length)


def mistral_terms(config: NeonConfig, keys: float) -> dict[str, float]:
    """Multiply-adds per token of the Mistral layer (per layer, except "logits")."""
    h, d = config.hidden_size, config.head_dim
    q_heads, kv_heads = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
    mlp_mats = 3 if config.gated_linear_unit else 2
    if config.num_moe_experts:
        ffn = config.moe_ffn_hidden_size or config.ffn_hidden_size
        mlp = config.moe_router_topk * mlp_mats * h * ffn + h * config.num_moe_experts
        if config.moe_shared_expert_intermediate_size:
            mlp += mlp_mats * h * config.moe_shared_expert_intermediate_size
    else:
        mlp = mlp_mats * h * config.ffn_hidden_size
    return {
        "attn_proj": h * q_heads * d + 2 * h * kv_heads * d + q_heads * d * h,  # W_q, W_k, W_v, W_o
        "attn_scores": 2 * keys * q_heads * d,  # Q K^T and A V
        "mlp": mlp,
        "logits": h * config.vocab_size,
    }


def flops_terms(config: NeonConfig, seq_length: int, causal: str = "half") -> dict[str, float]:
    """The Mistral terms, then each active feature's `flops_terms` (neon/features/), in order."""
    from neon.features import active  # the features import nothing from here; this keeps it so

    keys = attention_keys(seq_length, config.sliding_window, causal)
    terms = mistral_terms(config, keys)
    for feature in active(config):
        terms = feature.flops_terms(config, keys, terms)
    return terms


def forward_only_flops_per_token(config: NeonConfig, seq_length: int, causal: str = "half") -> float:
    """FLOPs per token of the features' forward-only work (`forward_only_flops`, e.g. FlamingMoE's
    frozen models): 2 x their multiply-adds x the model chunks (pipeline stages x virtual
    stages), since every chunk runs it once per micro-batch."""
    from neon.features import active

    macs = sum(feature.forward_only_flops(config, seq_length, causal) for feature in active(config))
    chunks = config.pipeline_model_parallel_size * (config.virtual_pipeline_model_parallel_size or 1)
    return 2.0 * macs * chunks


def training_flops_per_token(config: NeonConfig, seq_length: int, causal: str = "half") -> float:
    """Model FLOPs per trained token: 2 x passes x (layers x the per-layer terms + logits), plus
    the forward-only work (forward_only_flops_per_token)."""
    terms = flops_terms(config, seq_length, causal)
    layer = sum(v for k, v in terms.items() if k != "logits")
    macs = config.num_layers * layer + terms["logits"]
    passes = 4 if config.recompute_granularity == "full" else 3
    return 2.0 * macs * passes + forward_only_flops_per_token(config, seq_length, causal)
