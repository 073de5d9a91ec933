"""Each CPU-runtime patch makes a megatron-core call work that fails without it.

One spawned process runs every check twice: with all patches (must work), then with that one
patch removed (must fail), and puts the patch back."""

import numpy as np
import pytest
import torch

from megatron_plugins import cpu_runtime
from tests.dist import run_distributed


def _rng_tracker():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(7)
    with get_cuda_rng_tracker().fork():
        torch.rand(1)


_buffers = iter(range(10**6))


def _current_device():
    from megatron.core import parallel_state

    parallel_state.get_global_memory_buffer().get_tensor((2, 2), torch.float32, f"check{next(_buffers)}")


def _clip_grads():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 3.0)
    clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=6.0)
    # megatron scales by max_norm / (total_norm + 1e-6): one fp32 division and one product
    expected = torch.full((4,), 3.0) * torch.tensor(1.0 / (6.0 + 1.0e-6), dtype=torch.float32)
    torch.testing.assert_close(param.grad, expected, rtol=2 * 2.0 ** -24, atol=0)


def _synchronize():
    torch.cuda.synchronize()


def _streams_events():
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        event = torch.cuda.Event()
        event.record()
    torch.ones(2).record_stream(stream)


def _router_gemm():
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    out = router_gating_linear(torch.ones(3, 4), torch.ones(2, 4), None, torch.float32)
    assert out.shape == (3, 2)


def _split_sizes():
    from megatron.core.transformer.moe import token_dispatcher

    sizes = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert isinstance(sizes, np.ndarray), "all_to_all_single needs split sizes as a list/array"


CHECKS = {
    "rng_tracker": _rng_tracker,
    "current_device": _current_device,
    "cuda_device_mode": _clip_grads,
    "synchronize": _synchronize,
    "streams_events": _streams_events,
    "tensor_type": _clip_grads,
    "moe_router_gemm": _router_gemm,
    "moe_split_sizes": _split_sizes,
}


# Checked by a whole training run: the interleaved PP2 layout in tests/neon/training/test_training_layouts.py
# computes wrong losses without it (activations and gradients swap between the two ranks).
CHECKED_BY_LAYOUT_TEST = {"p2p_unbatched": "pp2-vpp2-interleaved"}


def check_each_patch():
    outcome = {}
    for name, check in CHECKS.items():
        check()  # all patches on: must work
        cpu_runtime.remove(name)
        try:
            check()
            outcome[name] = "worked without the patch"
        except Exception as e:  # noqa: BLE001 - any failure shows the patch is needed
            outcome[name] = f"failed without: {type(e).__name__}: {str(e)[:80]}"
        finally:
            cpu_runtime.install()
    return outcome


def test_every_patch_is_checked():
    assert set(CHECKS) | set(CHECKED_BY_LAYOUT_TEST) == set(cpu_runtime.PATCHES)
    from tests.neon.training import test_training_layouts

    assert "pp2-vpp2-interleaved" in test_training_layouts.LAYOUT_IDS


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime is off when CUDA is present")
def test_each_patch_fixes_a_failure():
    (outcome,) = run_distributed(check_each_patch, world_size=1, timeout=120)
    not_needed = {k: v for k, v in outcome.items() if not v.startswith("failed without")}
    assert not not_needed, not_needed


def test_sequence_parallel_norm_is_supported():
    """megatron's torch norm refuses sequence parallelism; Neon's RMSNorm marks its weight so
    megatron DDP all-reduces its gradient over the tensor-parallel group."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_plugins.norm import RMSNorm

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                            tensor_model_parallel_size=2, sequence_parallel=True,
                            normalization="RMSNorm")
    with pytest.raises(AssertionError, match="sequence parallel"):
        WrappedTorchNorm(cfg, 8)
    norm = RMSNorm(cfg, 8)
    assert norm.weight.sequence_parallel is True
    x = torch.randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    # the same formula, computed in another order (rsqrt, fused mean): each side is within ~9 fp32
    # roundings of the exact value (the 8-term sum's error halves through the square root, then
    # eps, the root, the product, the weight), so the two within 18; we allow 32 (1.9e-6 relative)
    torch.testing.assert_close(norm(x), expected, rtol=32 * 2.0 ** -24, atol=0)
