"""nGPT (neon/ngpt.py, neon/ngpt_optimizer.py) under the feature contract.

Its modules import neon.config, which registers this feature: the hooks import them on use."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from neon.features.base import Feature


@dataclass
class NGPTSettings:
    ngpt: bool = False
    """nGPT: hidden states and weights on the unit hypersphere."""
    ngpt_alpha_sz_scale: Literal["inv_sqrt_d", "inv_d"] = "inv_sqrt_d"
    """The stored scale of every residual update's alpha (alpha_A, alpha_M, and one per residual
    slot another feature adds) and s_z, which sets how far Adam moves them per step: 'inv_sqrt_d'
    (1/sqrt(d_model), the paper's, and every checkpoint's before this setting existed) or 'inv_d'
    (1/d_model: sqrt(d_model) times the step, nGPT's recipe for new runs, docs/ngpt.md). s_qk stays
    at 1/sqrt(d_model), s_u and s_v at 1."""


class NGPTFeature(Feature):
    name = "ngpt"
    settings = NGPTSettings
    hf_fields = ("ngpt", "ngpt_alpha_sz_scale")
    needs = ("unit_sphere",)  # every other active feature's weights and updates defined on the sphere
    ablation_name = "ngpt"
    ablation_settings = {"ngpt": True}
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
        from neon import ngpt
        from neon.features import layer_slots

        return ngpt.ngpt_layer_spec(spec, config, *layer_slots(config))  # no norms, residual updates on the sphere

    def block_spec(self, block, config):
        return replace(block, layer_norm=None)  # no final norm

    def attach(self, model, config, post_process):
        from neon import ngpt

        if post_process:
            ngpt.attach_logit_scale(model, config)  # z <- z * s_z
        # E_in, E_out, W_q/k/v/o, W_gate/up/down and every matrix a module declares on the sphere
        ngpt.mark_and_normalize_weights(model)

    def wrap_optimizer(self, optimizer, config):
        from neon.ngpt_optimizer import add_weight_normalization

        return add_weight_normalization(optimizer)  # the weights back on the sphere after every step

    # --- HF weight mapping: the scaling vectors, stored values as they are ---------------------
    def hf_layer_tensors(self, config):
        from neon.features import layer_slots

        _, residuals = layer_slots(config)
        return [
            ("self_attn.s_qk", "self_attention.core_attention.s_qk", 0),  # [heads * head_dim]
            ("mlp.s_u", "mlp.s_u", 0),                                    # [ffn]
            ("mlp.s_v", "mlp.s_v", 0),                                    # [ffn]
            # alpha_A, alpha_M and every other residual update's alpha [d_model]
            *[(f"{hf}_alpha", f"{slot}.alpha", None) for slot, hf in residuals.items()],
        ]

    def hf_global_tensors(self, config):
        return [("lm_head.s_z", "logit_scale.s_z", 0, "post")]  # [vocab]

    def hf_dropped(self, config):
        from neon.features import layer_slots

        norms, _ = layer_slots(config)  # no RMSNorm weights anywhere: the layers' norms and the final norm
        return (*(f"{hf}.weight" for hf in norms.values()), "model.norm.weight")

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
