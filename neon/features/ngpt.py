"""nGPT (neon/ngpt.py) under the feature contract."""

from __future__ import annotations

from dataclasses import replace

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from neon import ngpt
from neon.features.base import Feature

# no RMSNorm weights anywhere (HF names): the layers' pre-norms and the final norm
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "pre_flaming_layernorm.weight",
         "model.norm.weight")


class NGPTFeature(Feature):
    name = "ngpt"
    fields = ("ngpt", "ngpt_alpha_sz_scale")
    hf_fields = fields
    hf_reference = ("NeonDecoderLayer.residual", "NeonAttention.transform_qk", "NeonMLP.forward",
                    "NeonForCausalLM.scale_logits", "NeonForCausalLM.normalize_ngpt_weights")

    def validate(self, config, fail) -> None:
        if not config.ngpt:
            return
        if config.tie_word_embeddings:
            fail("tie_word_embeddings", True, "nGPT keeps separate input and output embeddings "
                 "(E_in, E_out), each normalised on its own", "set tie_word_embeddings=False")
        if config.add_bias_linear:
            fail("add_bias_linear", True, "nGPT layers have no biases", "set add_bias_linear=False")
        if not config.gated_linear_unit or config.activation_func is not F.silu:
            fail("gated_linear_unit", config.gated_linear_unit, "nGPT's MLP is SwiGLU (scaled u and v)",
                 "set gated_linear_unit=True and activation_func=F.silu")
        if config.qk_layernorm:
            fail("qk_layernorm", True, "nGPT normalises q and k itself (after RoPE)", "set qk_layernorm=False")
        if config.num_moe_experts is not None:
            fail("num_moe_experts", config.num_moe_experts, "nGPT is implemented for the dense MLP "
                 "only", "turn experts off (num_moe_experts=None) or nGPT off")
        if config.multi_latent_attention:
            fail("multi_latent_attention", True, "nGPT needs Neon's self-attention",
                 "set multi_latent_attention=False")

    def configure(self, config):
        # nGPT's recipe: every weight drawn with std 1/sqrt(d_model) (then put on the sphere)
        if config.init_method_std == TransformerConfig.init_method_std:
            config.init_method_std = config.hidden_size ** -0.5
        if config.output_layer_init_method is None:
            config.output_layer_init_method = init_method_normal(config.init_method_std)
        return {}

    def layer_spec(self, spec, config, use_te):
        return ngpt.ngpt_layer_spec(spec, config)  # no norms, residual updates on the sphere

    def block_spec(self, block, config):
        return replace(block, layer_norm=None)  # no final norm

    def attach(self, model, config, post_process):
        if post_process:
            ngpt.attach_logit_scale(model, config)  # z <- z * s_z
        # E_in, E_out, W_q/k/v/o, W_gate/up/down on the sphere (FlamingMoE's functions included)
        ngpt.mark_and_normalize_weights(model)

    # --- HF weight mapping: the scaling vectors, stored values as they are ---------------------
    def hf_layer_tensors(self, config):
        entries = [
            ("attn_alpha", "self_attn_bda.alpha", None),                  # alpha_A [d_model]
            ("mlp_alpha", "mlp_bda.alpha", None),                         # alpha_M [d_model]
            ("self_attn.s_qk", "self_attention.core_attention.s_qk", 0),  # [heads * head_dim]
            ("mlp.s_u", "mlp.s_u", 0),                                    # [ffn]
            ("mlp.s_v", "mlp.s_v", 0),                                    # [ffn]
        ]
        if config.flaming_moe == "between":  # alpha_F of FlamingMoE's normalized update
            entries.append(("flaming_alpha", "flaming_bda.alpha", None))
        return entries

    def hf_global_tensors(self, config):
        return [("lm_head.s_z", "logit_scale.s_z", 0, "post")]  # [vocab]

    def hf_dropped(self, config):
        return NORMS

    def recipe(self, config):
        # - the weights live on the unit sphere: decay would only fight the normalisation (the
        #   paper trains without it), and the paper's recipe has no learning-rate warmup;
        # - alpha and s_z stored at 1/d_model: sqrt(d_model) times the paper's Adam step, so they
        #   reach the values nGPT needs (s_z ~10-20, alpha ~0.3) at a base model's lr (docs/ngpt.md);
        # - lr 1e-2 (min_lr 1e-3) where no lr was given: nGPT's best rate at d=128, 3x the
        #   base's (docs/ablations.md). min_lr follows lr (neon/training/config/recipes.py).
        return {"model": {"ngpt_alpha_sz_scale": "inv_d"},
                "optimizer": {"weight_decay": 0.0, "lr": 1e-2, "min_lr": 1e-3},
                "schedule": {"lr_warmup_iters": 0}}
    # flops_terms: today's count is the Mistral layer's (norms and scalings are not matmuls)
