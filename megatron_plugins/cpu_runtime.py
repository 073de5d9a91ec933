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
    "cuda_device_mode": "hard-coded device='cuda' / .cuda() (schedules, optimizer, clip_grads): rewrite to CPU; "
    "pin_memory=True (the context-parallel RoPE slice) needs an accelerator: drop it",
    "synchronize": "torch.cuda.synchronize (p2p, checkpoint writer) becomes a no-op",
    "streams_events": "torch.cuda Stream/Event/current_stream/stream (DDP, MoE dispatcher) become torch.cpu's",
    "tensor_type": "clip_grads and the optimizers check Tensor.type() == 'torch.cuda.FloatTensor'",
    "moe_router_gemm": "moe_utils names te_general_gemm without TE installed (NameError); set it to None",
    "moe_split_sizes": "the alltoall dispatcher converts split sizes to numpy only for CUDA tensors",
    "p2p_unbatched": "gloo mismatches a batched send/recv in both directions between the same two ranks "
    "(interleaved PP=2): every config is forced to unbatched p2p (batch_p2p_comm=False)",
}

_originals: dict[str, list[tuple[object, str, object]]] = {}  # patch -> (owner, attr, original)
_mode: TorchFunctionMode | None = None
_MISSING = object()


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
    return frozenset(_originals)


def install(skip: tuple[str, ...] = ()) -> frozenset[str]:
    """Apply every patch (except those in `skip`) when CUDA is absent. Idempotent."""
    if cuda_available():
        return frozenset()
    for name in PATCHES:
        if name not in skip and name not in _originals:
            _originals[name] = []
            globals()[f"_patch_{name}"](functools.partial(_set, name))
    return installed()


def remove(name: str) -> None:
    """Undo one patch (tests use this to show what fails without it)."""
    global _mode
    for owner, attr, original in reversed(_originals.pop(name, [])):
        if original is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)
    if name == "cuda_device_mode" and _mode is not None:
        _mode.__exit__(None, None, None)
        _mode = None


def _set(patch: str, owner, attr: str, value) -> None:
    _originals[patch].append((owner, attr, getattr(owner, attr, _MISSING)))
    setattr(owner, attr, value)


# --- the patches ------------------------------------------------------------------------


def _patch_rng_tracker(set_):
    import logging

    from megatron.core.tensor_parallel import random as mp_random

    # The tracker warns when the CPU generator moves inside a fork; on the CPU the forked
    # generator IS the CPU one, so the warning would fire on every dropout draw.
    logging.getLogger(mp_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage())

    set_(mp_random, "_get_cuda_rng_state", lambda device="cuda", clone=False, graph_safe=False:
         torch.get_rng_state())
    set_(mp_random, "_set_cuda_rng_state", lambda new_state, device=-1, graph_safe=False:
         torch.set_rng_state(new_state))
    set_(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    set_(torch.cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator only
    set_(torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    set_(torch.cuda, "manual_seed_all", lambda seed: None)


def _patch_current_device(set_):
    set_(torch.cuda, "current_device", lambda: torch.device("cpu"))
    set_(torch.cuda, "set_device", lambda _device: None)


def _to_cpu(dev):
    """Map a CUDA device spec (str or torch.device) to the CPU; leave others alone."""
    if isinstance(dev, torch.device):
        return torch.device("cpu") if dev.type == "cuda" else dev
    if isinstance(dev, str) and dev.startswith("cuda"):
        return "cpu"
    return dev


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites device='cuda' arguments, `.cuda()` and `.to('cuda')` to the CPU, and drops
    pin_memory=True (pinned memory needs an accelerator; torch raises without one)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


def _patch_cuda_device_mode(set_):
    global _mode
    _mode = _CudaToCpuMode()
    _mode.__enter__()  # stays active for the life of the process (remove() exits it)


def _patch_synchronize(set_):
    set_(torch.cuda, "synchronize", lambda device=None: None)


class _Event:
    """Stand-in for torch.cuda.Event: CPU work is already ordered."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False, **_):
        pass

    def record(self, stream=None):
        return None

    def wait(self, stream=None):
        return None

    def query(self):
        return True

    def synchronize(self):
        return None


class _Stream:
    """Stand-in for torch.cuda.Stream: one in-order CPU stream."""

    def __init__(self, device=None, priority=0, **_):
        pass

    def wait_stream(self, stream):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        return event or _Event()

    def query(self):
        return True

    def synchronize(self):
        return None


def _patch_streams_events(set_):
    set_(torch.cuda, "Event", _Event)
    set_(torch.cuda, "Stream", _Stream)
    set_(torch.cuda, "current_stream", lambda device=None: _Stream())
    set_(torch.cuda, "default_stream", lambda device=None: _Stream())
    set_(torch.cuda, "stream", lambda stream=None: contextlib.nullcontext())
    set_(torch.Tensor, "record_stream", lambda self, stream: None)


def _patch_tensor_type(set_):
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

    set_(torch.Tensor, "type", tensor_type)


def _patch_moe_router_gemm(set_):
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        set_(moe_utils, "te_general_gemm", None)


def _maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


def _patch_moe_split_sizes(set_):
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    set_(moe_utils, "maybe_move_tensor_to_cpu", _maybe_move_tensor_to_cpu)
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        set_(token_dispatcher, "maybe_move_tensor_to_cpu", _maybe_move_tensor_to_cpu)


def _patch_p2p_unbatched(set_):
    from megatron.core.model_parallel_config import ModelParallelConfig

    original = ModelParallelConfig.__post_init__

    def post_init(self):
        self.batch_p2p_comm = False
        original(self)

    set_(ModelParallelConfig, "__post_init__", post_init)
