"""FlamingMoE's router losses (and IO functions' own losses) in the training step and the training log.

The load-balancing and z-losses are megatron-core's: attached to the routing weights by
MoEAuxLossAutoScaler (their gradients join the backward pass) and recorded per layer in
megatron's aux-loss tracker as 'flaming_<bank>_load_balancing_loss' / 'flaming_<bank>_z_loss'.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)

from neon.io.base import AttachLoss

PREFIX = "flaming_"


def set_aux_loss_scale(config, num_microbatches: int) -> None:
    """The scale megatron's schedules give MoE aux-loss gradients (loss scale / micro-batches),
    which they set only when the model config has MoE MLPs (config.num_moe_experts)."""
    scale = torch.ones(1)
    if config.grad_scale_func is not None:
        scale = config.grad_scale_func(scale)
    if not config.calculate_per_token_loss:
        scale = scale / num_microbatches
    # IO functions' own losses (a learned query's) are means over this rank's tokens: DDP's average
    # over the data- and context-parallel ranks averages them.
    AttachLoss.scale = float(scale)
    # The router losses are computed over the TP x CP group's tokens (megatron's router); each rank
    # holds a share of their gradient. A mean loss averages the shares over DP x CP: megatron's
    # x CP restores them. A per-token loss sums them and divides by the loss tokens, and megatron's
    # router weights them by the rank's own tokens, a (TP x CP)-th of the group's: x TP x CP
    # restores the group's (megatron-core 0.16.1 omits this factor: its per-token router losses
    # shrink by 1 / (TP x CP)).
    if config.calculate_per_token_loss:
        scale = scale * config.tensor_model_parallel_size * config.context_parallel_size
    else:
        scale = scale * config.context_parallel_size
    if config.num_moe_experts is None:  # megatron's schedules set it for configs with MoE MLPs
        MoEAuxLossAutoScaler.set_loss_scale(scale)


def aux_loss_report(num_microbatches: int = 1, clear: bool = True) -> dict[str, float]:
    """{'flaming_<bank>_<loss>': mean over layers and micro-batches} of the values recorded since
    the last clear (`num_microbatches` of them), reduced over pipeline stages and data-parallel
    ranks (collective: call on every rank, e.g. once per logged step)."""
    tracker = get_moe_layer_wise_logging_tracker()
    names = sorted(n for n in tracker if n.startswith(PREFIX))
    if not names:
        return {}
    if torch.distributed.is_initialized():
        reduce_aux_losses_tracker_across_ranks(names)
    report = {}
    for name in names:
        values = tracker[name]["values"]
        layers = (values != 0).sum().clamp(min=1)
        report[name] = (values.sum() / layers).item() / num_microbatches
    if clear:
        clear_aux_losses_tracker()
    return report
