"""Per-step reports of the routed layers: megatron MoE MLPs' router losses and what each active
feature reports (`Feature.step_report`: FlamingMoE's router losses, ...), for the logs."""

from __future__ import annotations

from neon.config import NeonConfig
from neon.features import active


def step_reports(chunks: list, config: NeonConfig, *, iteration: int, num_microbatches: int,
                 step_time_s: float) -> dict:
    """{name: value} of this step: megatron MoE MLPs' router losses (reduced over ranks via its
    aux-loss tracker) and every active feature's report. Collective."""
    report: dict = {}
    for feature in active(config):
        report.update(feature.step_report(chunks, config, step_time_s=step_time_s,
                                          num_microbatches=num_microbatches))
    if config.num_moe_experts:
        from megatron.core.transformer.moe.moe_utils import track_moe_metrics

        totals: dict = {}
        track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=iteration, total_loss_dict=totals,
                          num_layers=config.num_layers, moe_layer_freq=config.moe_layer_freq,
                          mtp_num_layers=config.mtp_num_layers)
        report.update({k: float(v) for k, v in totals.items()})
    return report


def clear_router_aux_losses() -> None:
    """Drop what megatron's aux-loss tracker gathered (an evaluation's forward passes add to it)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()
