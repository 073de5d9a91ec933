"""megatron-core's optimizer and learning-rate scheduler for a Neon run.

    optimizer = build_optimizer(chunks, optimizer_config(cfg))
    scheduler = scheduler_for(cfg, optimizer)

With nGPT, every optimizer step ends with the weights put back on the unit sphere
(`neon.ngpt_optimizer`).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from neon.ngpt_optimizer import add_weight_normalization


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
    """megatron's optimizer for these chunks; with nGPT, each step ends with the weights put back
    on the unit sphere (`neon.ngpt_optimizer`)."""
    optimizer = get_megatron_optimizer(opt_config, chunks)
    if chunks[0].config.ngpt:
        optimizer = add_weight_normalization(optimizer)
    return optimizer


def build_scheduler(optimizer, *, lr: float, min_lr: float, warmup_init: float, warmup_iters: int,
                    decay_iters: int, decay_style: str, weight_decay: float,
                    wsd_decay_iters: Optional[int] = None, wsd_decay_style: Optional[str] = None):
    """megatron-core's OptimizerParamScheduler stepping once per iteration (warmup, then
    constant / linear / cosine / inverse-square-root / WSD decay to min_lr). A checkpoint's
    scheduler state wins over these settings on load."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=warmup_init, max_lr=lr, min_lr=min_lr, lr_warmup_steps=warmup_iters,
        lr_decay_steps=decay_iters, lr_decay_style=decay_style, start_wd=weight_decay,
        end_wd=weight_decay, wd_incr_steps=decay_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False,
        wsd_decay_steps=wsd_decay_iters, lr_wsd_decay_style=wsd_decay_style)


def scheduler_for(cfg, optimizer):
    """The scheduler of the run's `optimizer` (peak/min lr, weight decay) and `schedule`
    (warmup, decay) sections."""
    o, s = cfg.optimizer, cfg.schedule
    return build_scheduler(
        optimizer, lr=o.lr, min_lr=o.min_lr, warmup_init=s.lr_warmup_init, warmup_iters=s.lr_warmup_iters,
        decay_iters=s.lr_decay_iters or s.train_iters, decay_style=s.lr_decay_style,
        weight_decay=o.weight_decay, wsd_decay_iters=s.lr_wsd_decay_iters, wsd_decay_style=s.lr_wsd_decay_style)


def current_lr(optimizer) -> float:
    """The learning rate to log: megatron's canonical one, else the first parameter group's."""
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

    lr = get_canonical_lr_for_logging(optimizer.param_groups)
    return lr if lr is not None else optimizer.param_groups[0]["lr"]
