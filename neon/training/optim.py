"""megatron-core's optimizer and learning-rate scheduler for a Neon run.

    optimizer = build_optimizer(chunks, optimizer_config(cfg))
    scheduler = scheduler_for(cfg, optimizer)

Each active feature may add work to every optimizer step (`Feature.wrap_optimizer`: nGPT puts
the weights back on the unit sphere).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from neon.features import active


def optimizer_config(cfg) -> OptimizerConfig:
    """megatron's OptimizerConfig from the run's `optimizer`, `model` (precision) and
    `parallelism` (distributed optimizer) sections."""
    o, m = cfg.optimizer, cfg.model
    return OptimizerConfig(
        optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, sgd_momentum=o.sgd_momentum,
        clip_grad=o.clip_grad, bf16=m.bf16, fp16=m.fp16,
        params_dtype=torch.bfloat16 if m.bf16 else torch.float16 if m.fp16 else torch.float32,
        use_distributed_optimizer=cfg.parallelism.use_distributed_optimizer,
    )


def build_optimizer(chunks: list, opt_config: OptimizerConfig):
    """megatron's optimizer for these chunks, wrapped by each active feature (`wrap_optimizer`)."""
    optimizer = get_megatron_optimizer(opt_config, chunks)
    config = chunks[0].config
    for feature in active(config):
        optimizer = feature.wrap_optimizer(optimizer, config)
    return optimizer


class Scheduler(OptimizerParamScheduler):
    """megatron-core's scheduler, whose override also covers the parameter groups: each group's
    max_lr / min_lr (which get_lr reads before the scheduler's own) come back from a checkpoint
    with the optimizer's state, so with --override-opt-param-scheduler the values built from this
    run's settings are put back before the schedule is restored."""

    def __init__(self, optimizer, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.built_group_lrs = [{k: g[k] for k in ("max_lr", "min_lr") if k in g} for g in optimizer.param_groups]

    def load_state_dict(self, state_dict: dict) -> None:
        if self.override_opt_param_scheduler:
            for group, built in zip(self.optimizer.param_groups, self.built_group_lrs):
                group.update(built)
        super().load_state_dict(state_dict)


def build_scheduler(optimizer, *, lr: float, min_lr: float, warmup_init: float, warmup_iters: int,
                    decay_iters: int, decay_style: str, weight_decay: float,
                    wsd_decay_iters: Optional[int] = None, wsd_decay_style: Optional[str] = None,
                    override: bool = False):
    """megatron-core's OptimizerParamScheduler stepping once per iteration (warmup, then
    constant / linear / cosine / inverse-square-root / WSD decay to min_lr).

    On load the checkpoint's step count always wins. Its lr, min_lr, warmup and decay iterations,
    decay style and weight decay win too, unless `override` (Megatron-LM's
    --override-opt-param-scheduler): then these arguments do. lr_warmup_init and the WSD anneal
    are not in the checkpoint: they always come from here."""
    return Scheduler(
        optimizer, init_lr=warmup_init, max_lr=lr, min_lr=min_lr, lr_warmup_steps=warmup_iters,
        lr_decay_steps=decay_iters, lr_decay_style=decay_style, start_wd=weight_decay,
        end_wd=weight_decay, wd_incr_steps=decay_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not override, override_opt_param_scheduler=override,
        wsd_decay_steps=wsd_decay_iters, lr_wsd_decay_style=wsd_decay_style)


def scheduler_for(cfg, optimizer):
    """The scheduler of the run's `optimizer` (peak/min lr, weight decay) and `schedule`
    (warmup, decay) sections; `checkpointing.override_opt_param_scheduler` says whether they
    override a loaded checkpoint's."""
    o, s = cfg.optimizer, cfg.schedule
    return build_scheduler(
        optimizer, lr=o.lr, min_lr=o.min_lr, warmup_init=s.lr_warmup_init, warmup_iters=s.lr_warmup_iters,
        decay_iters=s.lr_decay_iters or s.train_iters, decay_style=s.lr_decay_style,
        weight_decay=o.weight_decay, wsd_decay_iters=s.lr_wsd_decay_iters, wsd_decay_style=s.lr_wsd_decay_style,
        override=cfg.checkpointing.override_opt_param_scheduler)


def current_lr(optimizer) -> float:
    """The learning rate to log: megatron's canonical one, else the first parameter group's."""
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

    lr = get_canonical_lr_for_logging(optimizer.param_groups)
    return lr if lr is not None else optimizer.param_groups[0]["lr"]
