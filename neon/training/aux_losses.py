"""Router auxiliary losses of a step (FlamingMoE banks and megatron MoE MLPs), for the logs."""

from __future__ import annotations

from neon.config import NeonConfig


def router_aux_losses(config: NeonConfig, iteration: int, num_microbatches: int) -> dict:
    """Router auxiliary losses of this step (FlamingMoE banks and/or megatron MoE MLPs), reduced
    over ranks via megatron's aux-loss tracker; empty without routed layers. Collective."""
    report: dict = {}
    if config.flaming_moe != "off":
        from neon.flaming.losses import aux_loss_report

        report.update(aux_loss_report(num_microbatches))
    if config.num_moe_experts:
        from megatron.core.transformer.moe.moe_utils import track_moe_metrics

        totals: dict = {}
        track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=iteration, total_loss_dict=totals,
                          num_layers=config.num_layers, moe_layer_freq=config.moe_layer_freq,
                          mtp_num_layers=config.mtp_num_layers)
        report.update({k: float(v) for k, v in totals.items()})
    return report


def clear_router_aux_losses(config: NeonConfig) -> None:
    """Drop what megatron's aux-loss tracker gathered (an evaluation's forward passes add to it)."""
    if config.num_moe_experts or config.flaming_moe != "off":
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
