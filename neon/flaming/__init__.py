"""FlamingMoE: per-token functions from a global bank and a per-layer bank, on megatron-core's MoE
machinery (router, token dispatchers, experts sharded over expert parallelism)."""

from neon.flaming.block import (
    FlamingMoE,
    FunctionBank,
    attach_global_bank,
    flaming_blocks,
    reset_usage,
    usage_counts,
)
from neon.flaming.layer import FlamingTransformerLayer, FlamingTransformerLayerSubmodules
from neon.flaming.losses import aux_loss_report, set_aux_loss_scale

__all__ = ["FlamingMoE", "FunctionBank", "FlamingTransformerLayer", "FlamingTransformerLayerSubmodules",
           "attach_global_bank", "flaming_blocks", "reset_usage", "usage_counts", "aux_loss_report",
           "set_aux_loss_scale"]
