"""Which model settings a checkpoint fixes, and the error when a run asks for others.

A checkpoint records the run's resolved config (`checkpointing.save(config=cfg.to_dict())`).
Before loading, the run's `model` section is compared with the saved one. Without this check a
checkpoint saved with `--diff-attention matched` loads into a model built without it whenever
the tensors happen to have the same names and shapes, and trains on as another architecture.

Must match (ARCHITECTURE):
  - every field that Neon adds to megatron-core's TransformerConfig (the Mistral settings and
    every registered feature's fields), found from the dataclass, so a new feature's fields are
    covered without editing this file; a feature lists the fields of its own that may differ
    (`Feature.run_fields`) and may say how a value compares (`Feature.architecture_value`);
  - megatron-core's fields that change the parameters or the function the model computes
    (MEGATRON_ARCHITECTURE: layers, widths, heads, norms, biases, MoE layout, ...);
  - the precision (PRECISION: bf16, fp16) when the optimizer state is loaded: it decides which
    tensors that state holds, and megatron-core 0.16.1 cannot load an fp32 run's optimizer
    state into a bf16 run. Weights alone (--no-load-optim, converted checkpoints) may change it.
May differ (MAY_DIFFER, the features' run_fields and every other megatron-core field): how the
same model is trained or run, which leaves its parameters and its function unchanged: dropout,
recompute, kernel fusions, CPU offloading, communication overlap, FP8/FP4 recipes, init settings
(the weights are loaded over them), and max_position_embeddings (RoPE has no parameters: a
longer context may continue a shorter one).
The parallel layout (TP/PP/EP/DP) lives in another section and may differ too: loading reshards.

A setting missing from an older checkpoint's config is compared as its default (the value that
code had before the setting existed).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from neon.config import NeonConfig
from neon.features import FEATURES

MEGATRON_ARCHITECTURE = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "kv_channels",
    "normalization", "layernorm_epsilon", "layernorm_zero_centered_gamma", "gated_linear_unit",
    "add_bias_linear", "add_qkv_bias", "qk_layernorm", "qk_l2_norm", "softmax_scale", "softmax_type",
    "attention_output_gate", "apply_residual_connection_post_layernorm", "fp32_residual_connection",
    "rotary_interleaved", "no_rope_freq", "window_attn_skip_freq", "glu_linear_offset",
    "activation_func_clamp_value", "multi_latent_attention", "experimental_attention_variant",
    "linear_attention_freq", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
    "linear_num_key_heads", "linear_num_value_heads", "dsa_indexer_n_heads", "dsa_indexer_head_dim",
    "dsa_indexer_topk", "mtp_num_layers", "num_moe_experts", "moe_ffn_hidden_size", "moe_layer_freq",
    "moe_router_topk", "moe_router_score_function", "moe_router_pre_softmax", "moe_router_num_groups",
    "moe_router_group_topk", "moe_router_topk_scaling_factor", "moe_router_enable_expert_bias",
    "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_latent_size", "mrope_section",
    "is_hybrid_model", "mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_num_heads",
)
PRECISION = ("bf16", "fp16")
MAY_DIFFER = frozenset({
    "max_position_embeddings", "hidden_dropout", "attention_dropout", "bias_activation_fusion",
    "masked_softmax_fusion", "bias_dropout_fusion", "apply_rope_fusion", "persist_layer_norm",
    "gradient_accumulation_fusion",
})


def defaults() -> dict:
    out = {}
    for f in dataclasses.fields(NeonConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def architecture_fields(with_optimizer: bool = True) -> list[str]:
    megatron = {f.name for f in dataclasses.fields(TransformerConfig)}
    neon = [f.name for f in dataclasses.fields(NeonConfig) if f.name not in megatron]
    fields = [*neon, *MEGATRON_ARCHITECTURE, *(PRECISION if with_optimizer else ())]
    run = MAY_DIFFER.union(*(f.run_fields for f in FEATURES.values()))
    return [n for n in fields if n not in run]


def _compared(name: str, value):
    """The value as the check compares it: its owning feature's `architecture_value`."""
    owner = next((f for f in FEATURES.values() if name in f.fields), None)
    return owner.architecture_value(name, value) if owner else value


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def differences(saved: dict, current: dict, with_optimizer: bool = True) -> list[tuple[str, object, object]]:
    """(setting, checkpoint's value, this run's value) for every setting that must match and differs."""
    defaults_ = defaults()
    out = []
    for name in architecture_fields(with_optimizer):
        if name not in current:
            continue
        before, now = saved.get(name, defaults_.get(name)), current[name]
        if not same(_compared(name, before), _compared(name, now)):
            out.append((name, before, now))
    return out


def _as_flag(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    if value is True:
        return flag
    if value is False:
        return "--no-" + name.replace("_", "-")
    if value is None:
        return f"{flag} null"
    return f"{flag} {value}"


def mismatch_message(path, saved_model: dict, current_model: dict, with_optimizer: bool = True) -> Optional[str]:
    """One paragraph naming every differing setting, both values and the fix; None when they match."""
    diff = differences(saved_model, current_model, with_optimizer)
    if not diff:
        return None
    listed = "; ".join(f"{name}: checkpoint {before!r}, this run {now!r}" for name, before, now in diff)
    flags = " ".join(_as_flag(name, before) for name, before, _ in diff)
    return (f"{path}: the checkpoint holds another model architecture than this run builds ({listed}). "
            f"Fix: run with the checkpoint's settings ({flags}, or the same values in the YAML file's model "
            f"section), or train the new architecture from scratch in another --save directory without "
            f"--load.")
