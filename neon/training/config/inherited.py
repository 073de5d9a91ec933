"""megatron-core's TransformerConfig fields in the `model` section: the ones Neon builds, and the
reason each other one is refused.

NeonConfig inherits every TransformerConfig field, and the model section offers them all
(model_section.py). A field Neon builds with is listed in BUILT and shows in --help. Every other
inherited field is hidden from --help and refused at start (exit 2) when a YAML file or a flag
gives it a value other than its default: the error names the field, why, and the fix. The
reasons come from REFUSED_GROUPS (the first group whose pattern matches), else OTHER_REASON.
tests/neon/training/config/test_inherited_flags.py walks every refused field through
pretrain_neon.py.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from neon.config import NeonConfig

BUILT = frozenset({
    # the Mistral layer's sizes and initialisation
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "kv_channels",
    "init_method_std", "embedding_init_method_std", "perform_initialization", "use_cpu_initialization",
    # precision (fp8: Transformer Engine's GEMMs, refused where TE is missing)
    "fp16", "bf16", "fp8", "fp8_recipe", "fp8_margin", "fp8_interval", "fp8_amax_history_len",
    "fp8_amax_compute_algo", "fp8_wgrad",
    # activation recompute, pipeline stage sizes, loss reduction (megatron's schedules and block)
    "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
    "distribute_saved_activations", "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
    "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split", "calculate_per_token_loss",
    "deterministic_mode",
})

REMOVE = "remove the flag (or the YAML key)"
REFUSED_GROUPS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("mtp_*",), "multi-token prediction (Neon builds no MTP block)", REMOVE),
    (("num_moe_experts", "moe_*", "overlap_moe_expert_parallel_comm", "ep_overlap_*"),
     "megatron-core's MoE layers: Neon's routed layers are FlamingMoE",
     "use the --flaming-* settings (docs/flaming_moe.md), or remove the flag"),
    (("multi_latent_attention", "experimental_attention_variant", "dsa_*", "linear_*"),
     "an attention variant Neon's layers do not build (they are Mistral's attention, or DiffAttention)",
     "remove the flag; Neon's attention variants are --diff-attention and --ngpt"),
    (("is_hybrid_model", "mamba_*", "use_mamba_mem_eff_path", "mlp_chunks_for_prefill"),
     "hybrid (Mamba) models, which Neon does not build", REMOVE),
    (("enable_cuda_graph", "cuda_graph_*", "external_cuda_graph"),
     "CUDA graphs, which Neon's training loop does not capture", REMOVE),
    (("fp4*",), "FP4 training, which Neon does not set up", "use --bf16 (or --fp8-format where TE is present)"),
    (("use_kitchen*", "kitchen_*"), "NVIDIA Kitchen quantization, which Neon does not set up", REMOVE),
    (("cpu_offloading*", "fine_grained_activation_offloading", "offload_modules", "min_offloaded_tensor_size"),
     "activation and weight offloading, which Neon's layers do not support",
     "use activation recompute (--recompute-granularity) instead"),
    (("hierarchical_context_parallel_sizes", "max_seqlen_per_dp_cp_rank", "hybrid_context_parallel",
      "cp_comm_type"), "context parallelism, which Neon does not build yet", REMOVE),
    (("tp_comm_*", "async_tensor_model_parallel_allreduce", "delay_wgrad_compute", "symmetric_ar_type"),
     "communication overlap through Transformer Engine's userbuffers, which Neon does not set up",
     "use --overlap-grad-reduce for the data-parallel overlap, or remove the flag"),
    (("inference_*", "flash_decode", "use_inference_optimized_layers", "batch_invariant_mode"),
     "megatron-core's inference engine; Neon generates through its Hugging Face export",
     "remove the flag; generate with tools/convert_to_hf.py's export"),
    (("heterogeneous_block_specs", "hetereogenous_dist_checkpoint"),
     "heterogeneous layers (a different spec per layer), which Neon does not build", REMOVE),
    (("qk_layernorm", "qk_l2_norm", "qk_clip*", "log_max_attention_logit", "attention_output_gate",
      "softmax_type", "softmax_scale", "rotary_interleaved", "no_rope_freq", "window_attn_skip_freq",
      "apply_residual_connection_post_layernorm", "layernorm_zero_centered_gamma", "fp32_residual_connection",
      "add_qkv_bias", "glu_linear_offset", "activation_func_clamp_value", "activation_func_fp8_input_store",
      "apply_query_key_layer_scaling", "attention_softmax_in_fp32", "mrope_section", "use_te_activation_func",
      "use_fused_weighted_squared_relu", "fused_single_qkv_rope", "memory_efficient_layer_norm"),
     "a layer variant Neon's Mistral layer does not build (the model would not be what the setting says)",
     "remove the flag; Neon's layer variants are its features (--diff-attention, --ngpt, --flaming-moe)"),
    (("cross_entropy_loss_fusion", "cross_entropy_fusion_impl"),
     "megatron's fused cross-entropy, which Neon's loss does not use", REMOVE),
    (("transformer_impl",), "Neon picks Transformer Engine's layers when TE imports, its local ones otherwise",
     "remove the flag"),
)
OTHER_REASON = ("Neon's model and training loop run megatron's layers and schedules with its default", REMOVE)


def inherited_fields() -> frozenset[str]:
    """TransformerConfig's fields that NeonConfig does not declare itself."""
    own = set(NeonConfig.__annotations__)
    return frozenset(f.name for f in dataclasses.fields(TransformerConfig) if f.name not in own)


INHERITED = inherited_fields()


def refusal(name: str) -> Optional[tuple[str, str]]:
    """(reason, fix) if `name` is an inherited field Neon does not build, else None."""
    if name not in INHERITED or name in BUILT:
        return None
    for patterns, reason, fix in REFUSED_GROUPS:
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return reason, fix
    return OTHER_REASON
