"""The pretraining run: build the model, optimizer and data from a resolved Config, train,
evaluate, checkpoint; stop cleanly on SIGTERM/SIGUSR1, loudly on a non-finite loss.

Every rank runs `pretrain(cfg)`. The pieces are megatron-core's (see
megatron_plugins/training.py); this file only orders them.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    get_num_microbatches,
    init_num_microbatches_calculator,
)
from megatron.core.optimizer import OptimizerConfig

from megatron_plugins import cpu_runtime, distributed
from megatron_plugins.training import build_model_chunks, build_optimizer, build_scheduler, evaluate, train_step
from neon.model import build_model
from neon.training import batches, checkpointing, run_lock
from neon.training.config import Config, dump_yaml
from neon.training.metrics import MetricsLogger, peak_tflops, training_flops_per_token


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; nothing of that state was saved."""


EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class SignalFlag:
    """Remembers the first SIGTERM/SIGUSR1; the loop saves and exits at the end of the step."""

    def __init__(self, enabled: bool):
        self.received: Optional[str] = None
        self._previous = {}
        if enabled:
            for sig in EXIT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.received = self.received or signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class RunSummary:
    iteration: int
    exit_reason: str  # "finished" | "signal SIGTERM" | "exit interval"
    last_checkpoint: Optional[str]
    train_loss: Optional[float]
    valid_loss: Optional[float]
    run_dir: str


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.logging.run_dir or cfg.checkpointing.save or "runs/neon")


def optimizer_config(cfg: Config) -> OptimizerConfig:
    o, m = cfg.optimizer, cfg.model
    return OptimizerConfig(
        optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, sgd_momentum=o.sgd_momentum,
        clip_grad=o.clip_grad, bf16=m.bf16, fp16=m.fp16,
        params_dtype=torch.bfloat16 if m.bf16 else torch.float16 if m.fp16 else torch.float32,
        use_distributed_optimizer=cfg.parallelism.use_distributed_optimizer,
    )


def _from_designated_rank(values: list[float], contribute: bool, flags: list[float]) -> list[float]:
    """One all-reduce: flags summed over all ranks, values taken from the one rank that
    contributes (the first rank of the last pipeline stage), so every rank sees the same."""
    data = torch.tensor(flags + [v if contribute and v is not None else 0.0 for v in values],
                        dtype=torch.float64, device=cpu_runtime.device())
    dist.all_reduce(data)
    return data.tolist()


def _reporting_rank() -> bool:
    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_data_parallel_rank() == 0
            and parallel_state.get_tensor_model_parallel_rank() == 0)


def pretrain(cfg: Config) -> RunSummary:
    p, s, d, c, lg = cfg.parallelism, cfg.schedule, cfg.data, cfg.checkpointing, cfg.logging
    signals = SignalFlag(c.exit_signal_handler)  # before DataLoader workers fork
    distributed.initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                           p.expert_model_parallel_size, cfg.virtual_pipeline_size, s.seed,
                           timeout_s=60 * p.distributed_timeout_minutes)
    lock = run_lock.acquire([c.save, run_dir_of(cfg)])  # one run per directory (collective); exit releases it
    rank = dist.get_rank()
    if not cpu_runtime.cuda_available():  # the CPU runtime's RNG tracker forks the CPU generator itself
        logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(rank, None, s.global_batch_size, s.micro_batch_size, dp_size)
    num_microbatches = get_num_microbatches()

    neon_config = cfg.neon_config()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
        use_distributed_optimizer=p.use_distributed_optimizer)
    chunks = build_model_chunks(neon_config, build_model, ddp_config=ddp_config)
    optimizer = build_optimizer(chunks, optimizer_config(cfg))
    scheduler = build_scheduler(
        optimizer, lr=cfg.optimizer.lr, min_lr=cfg.optimizer.min_lr, warmup_init=s.lr_warmup_init,
        warmup_iters=s.lr_warmup_iters, decay_iters=s.lr_decay_iters or s.train_iters,
        decay_style=s.lr_decay_style, weight_decay=cfg.optimizer.weight_decay,
        wsd_decay_iters=s.lr_wsd_decay_iters, wsd_decay_style=s.lr_wsd_decay_style)

    if c.save:
        checkpointing.prepare_writer()
    iteration, consumed = 0, 0
    last_saved = None
    if c.load:
        loaded = checkpointing.load(c.load, chunks, optimizer, scheduler, load_optimizer=not c.no_load_optim,
                                    load_rng=not c.no_load_rng, iteration=c.ckpt_step,
                                    distributed_optimizer=p.use_distributed_optimizer, config=cfg.to_dict())
        if loaded is not None:
            iteration, consumed = loaded.iteration, loaded.consumed_train_samples
            last_saved = iteration if c.load == c.save else None
            if rank == 0:
                how = " (resharded to this layout; RNG re-seeded)" if loaded.resharded else ""
                print(f" loaded checkpoint {checkpointing.iteration_dir(c.load, iteration)} at iteration "
                      f"{iteration}, {consumed} samples consumed{how}", flush=True)
        elif rank == 0:
            print(f" no checkpoint in {c.load}: starting from scratch", flush=True)

    from neon.data import NeonTokenizer, build_datasets

    tokenizer = NeonTokenizer(d.tokenizer_model)
    gbs = s.global_batch_size
    train_ds, valid_ds, _ = build_datasets(
        d.data_path, d.split, d.seq_length, (s.train_iters * gbs, s.eval_iters * gbs, s.eval_iters * gbs),
        s.seed, neon_config.vocab_size, tokenizer.eod, cache_dir=d.data_cache_path)
    loader_args = dict(micro_batch_size=s.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    train_iter = batches.iterators(train_ds, num_chunks=len(chunks), consumed_samples=consumed,
                                   num_workers=d.num_workers, **loader_args)

    def data_arg(iters):
        return iters if len(iters) > 1 else iters[0]

    def validation_loss() -> Optional[float]:
        if valid_ds is None or s.eval_iters == 0:
            return None
        valid_iter = batches.iterators(valid_ds, num_chunks=len(chunks), consumed_samples=0, num_workers=0,
                                       total_samples=s.eval_iters * gbs, **loader_args)
        loss = evaluate(chunks, data_arg(valid_iter), num_batches=s.eval_iters, num_microbatches=num_microbatches,
                        seq_length=d.seq_length, micro_batch_size=s.micro_batch_size)
        _clear_moe_tracker(neon_config)
        return _from_designated_rank([loss], _reporting_rank(), [])[0]

    run_dir = run_dir_of(cfg)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    logger = MetricsLogger(
        enabled=rank == 0, run_dir=run_dir, train_iters=s.train_iters, start_iteration=iteration,
        log_interval=lg.log_interval, global_batch_size=gbs, seq_length=d.seq_length,
        flops_per_token=training_flops_per_token(neon_config, d.seq_length), num_devices=dist.get_world_size(),
        peak_tflops_per_device=peak_tflops(lg.peak_tflops), tensorboard_dir=lg.tensorboard_dir,
        wandb_project=lg.wandb_project, wandb_name=lg.wandb_exp_name, wandb_dir=lg.wandb_save_dir,
        run_config=cfg.to_dict(), progress_bar=lg.progress_bar)

    def save():
        nonlocal last_saved
        if not c.save or last_saved == iteration:
            return
        t0 = time.perf_counter()
        path = checkpointing.save(c.save, iteration, chunks, optimizer, scheduler, consumed_train_samples=consumed,
                                  config=cfg.to_dict(), keep_last=c.ckpt_keep_last)
        last_saved = iteration
        logger.print(f" saved checkpoint {path} at iteration {iteration} in {time.perf_counter() - t0:.1f} s")

    exit_reason, train_loss, valid_loss = "finished", None, None
    if s.skip_train:
        try:
            if s.eval_iters:
                valid_loss = validation_loss()
                logger.evaluation(iteration=iteration, loss=valid_loss, consumed_samples=consumed)
        finally:
            logger.close()
            signals.restore()
            lock.release()
        return RunSummary(iteration=iteration, exit_reason="skip-train", last_checkpoint=None, train_loss=None,
                          valid_loss=valid_loss, run_dir=str(run_dir))
    try:
        while iteration < s.train_iters:
            t0 = time.perf_counter()
            result = train_step(chunks, optimizer, data_arg(train_iter), neon_config,
                                num_microbatches=num_microbatches, seq_length=d.seq_length,
                                micro_batch_size=s.micro_batch_size)
            if not result.skipped:
                scheduler.step(increment=1)
            iteration += 1
            consumed += gbs
            aux = _moe_aux_losses(neon_config, iteration, num_microbatches)
            signalled, loss, grad_norm = _from_designated_rank(
                [result.loss, result.grad_norm], _reporting_rank(), [float(signals.received is not None)])
            step_time = time.perf_counter() - t0
            if not (math.isfinite(loss) and (result.grad_norm is None or math.isfinite(grad_norm))):
                where = f"{checkpointing.iteration_dir(c.save, last_saved)}" if last_saved is not None else "none"
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                raise TrainingDiverged(
                    f"iteration {iteration}: the training {what} is not finite (loss {loss}, grad norm "
                    f"{grad_norm}); stopping without saving this state. Last good checkpoint: {where}. "
                    f"Fix: lower --lr, lengthen --lr-warmup-iters, keep --clip-grad on, or check the data; "
                    f"then resume with --load.")
            train_loss = loss
            logger.train_step(iteration=iteration, loss=loss, grad_norm=grad_norm if result.grad_norm is not None
                              else None, lr=_lr(optimizer), consumed_samples=consumed, step_time_s=step_time,
                              skipped=result.skipped, aux=aux)
            if s.eval_iters and (iteration % s.eval_interval == 0 or iteration == s.train_iters):
                valid_loss = validation_loss()
                logger.evaluation(iteration=iteration, loss=valid_loss, consumed_samples=consumed)
            if signalled:
                exit_reason = f"signal {signals.received or 'on another rank'}"
                logger.print(f" received {exit_reason} at iteration {iteration}: saving and exiting")
                save()
                break
            if c.save_interval and iteration % c.save_interval == 0:
                save()
            if s.exit_interval and iteration % s.exit_interval == 0:
                exit_reason = "exit interval"
                save()
                break
        else:
            save()
    finally:
        logger.close()
        signals.restore()
        lock.release()
    last = str(checkpointing.iteration_dir(c.save, last_saved)) if c.save and last_saved is not None else None
    return RunSummary(iteration=iteration, exit_reason=exit_reason, last_checkpoint=last,
                      train_loss=train_loss, valid_loss=valid_loss, run_dir=str(run_dir))


def _lr(optimizer) -> float:
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

    lr = get_canonical_lr_for_logging(optimizer.param_groups)
    return lr if lr is not None else optimizer.param_groups[0]["lr"]


def _moe_aux_losses(config, iteration: int, num_microbatches: int) -> dict:
    """Router auxiliary losses of this step (FlamingMoE banks and/or megatron MoE MLPs), reduced
    over ranks via megatron's aux-loss tracker; empty without routed layers. Collective."""
    report: dict = {}
    if getattr(config, "flaming_moe", "off") != "off":
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


def _clear_moe_tracker(config) -> None:
    if config.num_moe_experts or getattr(config, "flaming_moe", "off") != "off":
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
