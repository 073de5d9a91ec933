"""The Neon TransformerLayer as a megatron-core ModuleSpec.

Two flavours of the same layer: Transformer Engine modules when TE imports (the GPU production
path, FP8-capable), megatron-core's local modules otherwise. Both keep the norms as separate
modules (input_layernorm, pre_mlp_layernorm) so parameter names are the same in either flavour
and the Hugging Face mapping in `state_dict_adapter.py` serves both.
With every Neon switch off this is exactly a Mistral layer.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_plugins.logs import quiet_layer_logs
from megatron_plugins.norm import RMSNorm
from neon.attention import NeonCoreAttention
from neon.config import NeonConfig
from neon.features import active

try:  # Transformer Engine: present in NGC containers, absent on CPU machines
    import transformer_engine  # noqa: F401
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TENorm,
        TERowParallelLinear,
    )

    HAVE_TE = True
except ImportError:
    HAVE_TE = False


def _modules(use_te: bool) -> dict:
    if use_te:
        return dict(norm=TENorm, column=TEColumnParallelLinear, row=TERowParallelLinear,
                    core_attention=TEDotProductAttention)
    return dict(norm=RMSNorm, column=ColumnParallelLinear, row=RowParallelLinear,
                core_attention=NeonCoreAttention)


def get_neon_layer_spec(config: NeonConfig, use_te: Optional[bool] = None) -> ModuleSpec:
    """ModuleSpec of one Neon TransformerLayer (TE flavour when `use_te`, default: if TE imports):
    the Mistral layer, then each active feature's `layer_spec` (neon/features/) in registry order."""
    use_te = HAVE_TE if use_te is None else use_te
    quiet_layer_logs()  # megatron's "Unknown MLP type" line for feature MLPs
    m = _modules(use_te)
    spec = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=m["norm"],
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=m["column"],
                    core_attention=m["core_attention"],
                    linear_proj=m["row"],
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=m["norm"],
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=m["column"], linear_fc2=m["row"])),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    for feature in active(config):
        spec = feature.layer_spec(spec, config, use_te)
    return spec


def get_neon_block_spec(
    config: NeonConfig, use_te: Optional[bool] = None, vp_stage: Optional[int] = None
) -> TransformerBlockSubmodules:
    """The layers this pipeline stage builds, plus the final norm."""
    use_te = HAVE_TE if use_te is None else use_te
    layer = get_neon_layer_spec(config, use_te)
    block = TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=_modules(use_te)["norm"],
    )
    for feature in active(config):
        block = feature.block_spec(block, config)
    return block
