"""The training step, built from megatron-core's pieces.

Model chunks wrapped in megatron DDP and megatron's forward-backward schedules (no pipelining,
1F1B, interleaved 1F1B); the optimizer comes from `neon.training.optim`. Nothing here knows
about data files or logging: the caller (the Trainer, `neon/training/trainer.py`, or a test)
hands in iterators of micro-batches and reads back the losses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank, get_model_config

from megatron_plugins import cpu_runtime
from neon.config import NeonConfig
from neon.features import active


def build_model_chunks(config: NeonConfig, build_stage: Callable, wrap_ddp: bool = True,
                       ddp_config: Optional[DistributedDataParallelConfig] = None) -> list:
    """One model chunk per virtual pipeline stage (one chunk without interleaving).

    `build_stage(config, pre_process, post_process, vp_stage)` builds one chunk."""
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = build_stage(
            config,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                               vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=stage),
            vp_stage=stage,
        )
        model.to(cpu_runtime.device())
        if config.bf16:
            model.bfloat16()
        chunks.append(model)
    if wrap_ddp:
        ddp_config = ddp_config or DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False)
        chunks = [DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
                  for i, chunk in enumerate(chunks)]
    # Hooks the schedules call: gradient all-reduce across DP, tied/shared weights across PP.
    config.finalize_model_grads_func = finalize_model_grads
    if wrap_ddp and len(chunks) == 1:
        config.no_sync_func = chunks[0].no_sync
    elif wrap_ddp:
        config.no_sync_func = [c.no_sync for c in chunks]
    return chunks


def lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor, *, calculate_per_token_loss: bool = False):
    """Sum of the masked token losses, with the token count: megatron's per-token reduction.

    Under context parallelism each rank holds part of every sequence. With megatron's default
    (a mean per micro-batch, gradients averaged over DP x CP) its sum is scaled by CP and divided
    by the CP group's token count, so that the average is the token mean of the whole sequences
    (also when the ranks' loss masks keep different numbers of tokens). With
    --calculate-per-token-loss megatron sums the gradients and the token counts over DP x CP, which
    is exact as it is. The reported pair stays this rank's own."""
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(per_token_loss.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    reported = torch.stack([total.detach(), num_tokens.float()])
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1 and not calculate_per_token_loss:
        torch.distributed.all_reduce(num_tokens, group=parallel_state.get_context_parallel_group())
        total = total * cp
    return total, num_tokens, {"lm loss": reported}


WHOLE_SEQUENCE_KEYS = ("documents",)  # what context parallelism leaves whole in a micro-batch


def context_parallel_batch(batch: dict) -> dict:
    """This context-parallel rank's part of a micro-batch: megatron's head-tail split of every
    per-token tensor (neon/context_parallel.py), except the document ids, which attention needs
    for the whole sequence. The batch itself without context parallelism."""
    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    whole = {k: batch.pop(k) for k in WHOLE_SEQUENCE_KEYS if k in batch}
    return get_batch_on_this_cp_rank(batch) | whole


def forward_step(data_iterator: Iterator[dict], model):
    """Megatron's forward_step contract: (output, loss function of that output)."""
    device = cpu_runtime.device()
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    batch = context_parallel_batch(batch)
    # megatron's attention_mask argument carries the document ids (neon/attention.py), or None
    output = model(batch["tokens"], batch["position_ids"], batch.get("documents"), labels=batch["labels"])
    return output, partial(lm_loss, batch["loss_mask"],
                           calculate_per_token_loss=get_model_config(model).calculate_per_token_loss)


@dataclass
class StepResult:
    loss: Optional[float]  # mean token loss over the global batch (last stage), else None
    grad_norm: Optional[float]
    skipped: bool


def train_step(chunks: list, optimizer, data_iterator, config: NeonConfig, *,
               num_microbatches: int, seq_length: int, micro_batch_size: int,
               forward_step_func=forward_step) -> StepResult:
    """One optimizer step over `num_microbatches` micro-batches of this data-parallel rank."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    for feature in active(config):
        feature.before_step(config, num_microbatches)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,  # a list, one per chunk, when interleaved
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    update_ok, grad_norm, _ = optimizer.step()
    return StepResult(loss=reduce_losses(losses), grad_norm=grad_norm, skipped=not update_ok)


def after_step(chunks: list, config: NeonConfig, iteration: int) -> list[str]:
    """Every active feature's work after optimizer step `iteration` (FlamingMoE: a learned store's
    re-index); the lines it reports for the log."""
    return [line for feature in active(config) for line in feature.after_step(chunks, config, iteration)]


@torch.no_grad()
def evaluate(chunks: list, data_iterator, *, num_batches: int, num_microbatches: int, seq_length: int,
             micro_batch_size: int, forward_step_func=forward_step) -> Optional[float]:
    """Mean token loss over `num_batches` global batches with the forward-only schedule
    (the value on the last pipeline stage, None elsewhere). Puts the chunks back in train mode."""
    for chunk in chunks:
        chunk.eval()
    totals = []
    for _ in range(num_batches):
        losses = get_forward_backward_func()(
            forward_step_func=forward_step_func,
            data_iterator=data_iterator,
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            totals.append(torch.stack([item["lm loss"] for item in losses]).sum(0))
    for chunk in chunks:
        chunk.train()
    if not totals:
        return None
    total = torch.stack(totals).sum(0)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return (total[0] / total[1].clamp(min=1)).item()


def reduce_losses(losses: list) -> Optional[float]:
    """Token-weighted mean of the micro-batch losses over data- and context-parallel ranks."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    totals = torch.stack([item["lm loss"] for item in losses]).sum(0)
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return (totals[0] / totals[1].clamp(min=1)).item()


def reporting_rank() -> bool:
    """The rank whose values the logs show: first tensor-, context- and data-parallel rank of the
    last pipeline stage (where the losses are)."""
    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
            and parallel_state.get_tensor_model_parallel_rank() == 0)


def from_reporting_rank(values: list[Optional[float]], flags: tuple[float, ...] = ()) -> list[float]:
    """One all-reduce over all ranks: `flags` summed, then `values` as the reporting rank has
    them, so that every rank sees the same numbers. Collective."""
    contribute = reporting_rank()
    data = torch.tensor(list(flags) + [v if contribute and v is not None else 0.0 for v in values],
                        dtype=torch.float64, device=cpu_runtime.device())
    torch.distributed.all_reduce(data)
    return data.tolist()
