"""A Neon TransformerLayer with the FlamingMoE block between attention and MLP (the prototype's place).

    h = h + Attn(RMSNorm(h))                      (megatron's TransformerLayer)
    h = h + FlamingMoE(RMSNorm_flaming(h))        (this layer's addition)
    h = h + MLP(RMSNorm(h))                       (megatron's TransformerLayer)

For the other placement ('mlp') the block is the layer's `mlp` submodule: megatron's
TransformerLayer runs it, or, with IO functions, this class (its `flaming_moe` an IdentityOp),
which hands the block the token context:

    h = h + FlamingMoE(pre_mlp_layernorm(h), context)   (the MLP's place, its norm and residual)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Union

from megatron.core import tensor_parallel
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


@dataclass
class FlamingTransformerLayerSubmodules(TransformerLayerSubmodules):
    pre_flaming_layernorm: Union[ModuleSpec, type] = IdentityOp
    flaming_moe: Union[ModuleSpec, type] = IdentityOp
    flaming_bda: Union[ModuleSpec, type] = IdentityFuncOp


class FlamingTransformerLayer(TransformerLayer):
    def __init__(self, config, submodules: FlamingTransformerLayerSubmodules, layer_number: int = 1,
                 hidden_dropout=None, pg_collection=None, vp_stage=None, **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection,
                         vp_stage=vp_stage, **kwargs)
        self.pre_flaming_layernorm = build_module(submodules.pre_flaming_layernorm, config=self.config,
                                                  hidden_size=self.config.hidden_size,
                                                  eps=self.config.layernorm_epsilon)
        self.flaming_moe = build_module(submodules.flaming_moe, config=self.config,
                                        layer_number=self.layer_number, pg_collection=self.pg_collection)
        self.flaming_bda = build_module(submodules.flaming_bda)

    def forward(self, *args, **kwargs):
        """megatron's TransformerLayer.forward, with the token context of IO functions handed to
        the FlamingMoE block. The context arrives as megatron's `context` argument (which the
        block threads through every layer and through activation recompute; the cross-attention
        that would read it is an IdentityOp in Neon's layers) and is returned unchanged."""
        between, in_mlp = (getattr(m, "has_io", False) for m in (self.flaming_moe, self.mlp))
        if not (between or in_mlp):
            return super().forward(*args, **kwargs)
        kwargs.pop("dynamic_inference_decode_only", None)
        token_context = kwargs.get("context")
        hidden_states, context = self._forward_attention(*args, **kwargs)
        if in_mlp:  # 'mlp' placement
            return self._forward_flaming_mlp(hidden_states, token_context, kwargs.get("padding_mask")), context
        hidden_states = self._forward_flaming(hidden_states, token_context)
        output = TransformerLayer._forward_mlp(self, hidden_states, kwargs.get("inference_context"),
                                               padding_mask=kwargs.get("padding_mask"))
        return output, context

    def _forward_flaming_mlp(self, hidden_states, token_context, padding_mask=None):
        """'mlp' placement with IO functions: megatron's _forward_mlp steps (pre-MLP norm, the
        block in the MLP's place, with selective MLP recompute if configured, then the MLP's
        bias-dropout-add), the token context handed to the block."""
        residual = hidden_states
        pre = self._forward_pre_mlp_layernorm(hidden_states)
        mlp = functools.partial(self.mlp, padding_mask=padding_mask, context=token_context)
        out = tensor_parallel.checkpoint(mlp, False, pre) if self.recompute_mlp else mlp(pre)
        return self._forward_post_mlp(out, residual)

    def _forward_flaming(self, hidden_states, token_context=None):
        """h + FlamingMoE(norm(h)) with the layer's bias-dropout-add."""
        residual = hidden_states
        extra = {"context": token_context} if token_context is not None else {}
        r = self.flaming_moe(self.pre_flaming_layernorm(hidden_states), **extra)
        with self.bias_dropout_add_exec_handler():
            return self.flaming_bda(self.training, self.config.bias_dropout_fusion)(
                r, residual, self.hidden_dropout)

    def _forward_mlp(self, hidden_states, inference_context=None, padding_mask=None):
        hidden_states = self._forward_flaming(hidden_states)
        return super()._forward_mlp(hidden_states, inference_context, padding_mask=padding_mask)
