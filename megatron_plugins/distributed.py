"""Start torch.distributed and megatron-core's parallel state from a parallel layout.

Rendezvous. Under torchrun (or any launcher that sets WORLD_SIZE > 1 or MASTER_PORT) the
process joins env:// as usual. A single process started with plain `python` and no MASTER_PORT
hosts its own store on a port the kernel picks (port 0: no race with another run starting at the
same moment), so two such runs on one machine never collide. When MASTER_PORT is set and the
port is taken, `PortInUse` says so in one paragraph instead of torch's EADDRINUSE traceback.
"""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_plugins import cpu_runtime


class PortInUse(RuntimeError):
    """The rendezvous port that MASTER_PORT fixes is taken; the message names it and the fix."""


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
    virtual_pipeline: int | None = None,
    seed: int = 1234,
    timeout_s: float = 600,
    expert_tensor_parallel: int | None = None,
    context_parallel: int = 1,
) -> None:
    """Join the process group (env:// rendezvous, as torchrun sets it) and split it into
    tensor/pipeline/context/expert/data-parallel groups. Safe to call in a single process.
    expert_tensor_parallel: the experts' tensor-parallel size (megatron's default, None, is
    tensor_parallel; MoE layers whose experts are not split by TP need 1)."""
    cpu_runtime.install()
    if not dist.is_initialized():
        if cpu_runtime.cuda_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        _join(timedelta(seconds=timeout_s))
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
        context_parallel_size=context_parallel,
        distributed_timeout_minutes=timeout_s / 60,  # every group's collectives time out as the default group's
    )
    set_seed(seed)


def _join(timeout: timedelta) -> None:
    env = os.environ
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    alone = env.get("WORLD_SIZE", "1") == "1" and "MASTER_PORT" not in env
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    if alone:  # our own store on a free port; nobody else has to find it
        store = dist.TCPStore(env["MASTER_ADDR"], 0, 1, is_master=True, timeout=timeout)
        dist.init_process_group(cpu_runtime.backend(), store=store, rank=0, world_size=1, timeout=timeout)
        return
    try:
        dist.init_process_group(cpu_runtime.backend(), timeout=timeout)
    except dist.DistNetworkError as e:
        if "EADDRINUSE" not in str(e):
            raise
        raise PortInUse(
            f"MASTER_PORT={env['MASTER_PORT']} on {env['MASTER_ADDR']} is already in use (another run or "
            f"program listens there), so this run cannot start its rendezvous. Fix: choose a free port "
            f"(MASTER_PORT=...), or unset MASTER_PORT for a single-process run (it then picks a free "
            f"port itself); under torchrun use --standalone or another --rdzv-endpoint port.") from None


def set_seed(seed: int) -> None:
    """Same seed on every rank for Python's, numpy's and torch's default generators (as
    Megatron-LM's _set_random_seed; a checkpoint records all three, so two runs of the same
    command write the same bytes); megatron's tracker derives the per-tensor-parallel-rank
    stream used by dropout inside tensor-parallel regions."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
