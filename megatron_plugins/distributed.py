"""Start torch.distributed and megatron-core's parallel state from a parallel layout."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_plugins import cpu_runtime


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
    virtual_pipeline: int | None = None,
    seed: int = 1234,
    timeout_s: int = 600,
) -> None:
    """Join the process group (env:// rendezvous, as torchrun sets it) and split it into
    tensor/pipeline/expert/data-parallel groups. Safe to call in a single process."""
    cpu_runtime.install()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if cpu_runtime.cuda_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(cpu_runtime.backend(), timeout=timedelta(seconds=timeout_s))
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        expert_model_parallel_size=expert_parallel,
    )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Same seed on every rank for the default generator; megatron's tracker derives the
    per-tensor-parallel-rank stream used by dropout inside tensor-parallel regions."""
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
