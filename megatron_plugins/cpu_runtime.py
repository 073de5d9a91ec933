"""Run megatron-core on a machine with no CUDA.

megatron-core 0.16.1 assumes a CUDA device in many places. When CUDA is absent, `install()`
applies the named patches below, each fixing one assumption; with a GPU present it touches
nothing. This module is the one place in Neon that knows a GPU may be missing: the rest of
the code asks `device()` and carries on.

Every patch is listed in `PATCHES` (name -> one-line reason) and exercised by
tests/megatron_plugins/test_cpu_runtime.py, which removes it and shows the failure.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

PATCHES: dict[str, str] = {
    "rng_tracker": "the model-parallel RNG tracker reads and writes the CUDA generator; use the CPU one",
    "current_device": "~150 sites allocate on torch.cuda.current_device(); answer with the CPU device",
    "cuda_device_mode": "hard-coded device='cuda' / .cuda() (schedules, optimizer, clip_grads): rewrite to CPU",
    "synchronize": "torch.cuda.synchronize (p2p, checkpoint writer) becomes a no-op",
    "streams_events": "torch.cuda Stream/Event/current_stream/stream (DDP, MoE dispatcher) become torch.cpu's",
    "tensor_type": "clip_grads and the optimizers check Tensor.type() == 'torch.cuda.FloatTensor'",
    "moe_router_gemm": "moe_utils names te_general_gemm without TE installed (NameError); set it to None",
    "moe_split_sizes": "the alltoall dispatcher converts split sizes to numpy only for CUDA tensors",
    "memory_stats": "memory reporting asks torch.cuda for allocator statistics; report zero",
}

_installed: set[str] = set()
_mode: TorchFunctionMode | None = None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device Neon computes on: the current CUDA device, else the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend() -> str:
    """torch.distributed backend: NCCL on GPUs, gloo on the CPU."""
    return "nccl" if cuda_available() else "gloo"


def installed() -> frozenset[str]:
    return frozenset(_installed)


def install(skip: tuple[str, ...] = ()) -> frozenset[str]:
    """Apply every patch (except those in `skip`) when CUDA is absent. Idempotent."""
    if cuda_available():
        return frozenset()
    for name in PATCHES:
        if name not in skip and name not in _installed:
            globals()[f"_patch_{name}"]()
            _installed.add(name)
    return installed()


# --- the patches ------------------------------------------------------------------------


def _patch_rng_tracker():
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator only
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None


def _patch_current_device():
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.set_device = lambda _device: None
    torch.cuda.device_count = lambda: 0


def _to_cpu(dev):
    """Map a CUDA device spec (str, int ordinal, torch.device) to the CPU; leave others."""
    if isinstance(dev, torch.device):
        return torch.device("cpu") if dev.type == "cuda" else dev
    if isinstance(dev, str) and dev.startswith("cuda"):
        return "cpu"
    return dev


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites device='cuda' arguments, `.cuda()` and `.to('cuda')` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


def _patch_cuda_device_mode():
    global _mode
    _mode = _CudaToCpuMode()
    _mode.__enter__()  # stays active for the life of the process
    # a plain int ordinal (torch.cuda.current_device() style) reaching .to() is also the CPU
    torch.cuda.is_current_stream_capturing = lambda: False


def _patch_synchronize():
    torch.cuda.synchronize = lambda device=None: None


def _patch_streams_events():
    class Event(torch.cpu.Event):
        def __init__(self, enable_timing=False, blocking=False, interprocess=False, **_):
            super().__init__(enable_timing=enable_timing)

        def record(self, stream=None):
            return super().record(stream)

    class Stream(torch.cpu.Stream):
        def __new__(cls, device=None, priority=0, **_):
            return super().__new__(cls)

        def wait_stream(self, stream):
            return None

        def wait_event(self, event):
            return None

    torch.cuda.Event = Event
    torch.cuda.Stream = Stream
    torch.cuda.current_stream = lambda device=None: torch.cpu.current_stream()
    torch.cuda.default_stream = lambda device=None: torch.cpu.current_stream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.Tensor.record_stream = lambda self, stream: None


def _patch_tensor_type():
    original = torch.Tensor.type

    @functools.wraps(original)
    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            # under the cuda_device_mode TorchFunctionMode this wrapper can run twice: rename once
            if self.device.type == "cpu" and not name.startswith("torch.cuda."):
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type


def _patch_moe_router_gemm():
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_moe_split_sizes():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_memory_stats():
    torch.cuda.memory_allocated = lambda device=None: 0
    torch.cuda.max_memory_allocated = lambda device=None: 0
    torch.cuda.memory_reserved = lambda device=None: 0
    torch.cuda.empty_cache = lambda: None
