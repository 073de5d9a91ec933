"""Local core attention on a CUDA device, forward and backward in bf16: FlexAttention (sliding
window) and SDPA's flash/cuDNN kernel (plain causal) against a float32 math reference, for
grouped-query heads, DiffAttention's head counts and nGPT's scale; and the whole differential
core with a window against the same module computed on the CPU in float32."""

import copy
import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from neon.attention import attention
from neon.config import NeonConfig
from neon.diff_attention import DiffCoreAttention
from tests.neon.test_attention import reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def grads_of(fn, tensors, probe):
    """fn(*tensors) and the gradients of <fn, probe> (a random projection: gradients of order one)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    (out.float() * probe).sum().backward()
    return out.detach().float(), [t.grad.float() for t in leaves]


def assert_bf16_close(got, want, what, tol=2e-2):
    """bf16 arithmetic on the same (bf16-representable) inputs: ||got - want|| / ||want|| of order
    1e-3 to 1e-2 (METHOD.md); the bound leaves room for the longer bf16 reductions of backward."""
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert want.abs().max() > 1e-3 and rel < tol, (what, rel)


# (query heads, key/value heads), window, nGPT's normalised q/k: GQA 4:1 on SDPA's flash kernel,
# DiffAttention's 2n over 2g heads on it and on FlexAttention with nGPT's scale. Few windowed
# cases on purpose: each new shape or scale compiles FlexAttention again (seconds on the GPU
# machine, inside the 'tests' section's timeout); MHA and the other head counts are checked
# on the CPU (tests/neon/test_attention.py).
CASES = [((16, 4), None, False), ((32, 8), None, True), ((32, 8), 256, True)]


@pytest.mark.parametrize(("heads", "window", "normalized"), CASES)
def test_kernel_forward_and_backward_match_reference(heads, window, normalized):
    b, s, d = 2, 1024, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(b, heads[0], s, d), (b, heads[1], s, d), (b, heads[1], s, d)]
    q, k, v = (torch.randn(sh, device="cuda", generator=gen) for sh in shapes)
    if normalized:  # nGPT: unit q/k, softmax scale sqrt(d)
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    q, k, v = (t.bfloat16().float() for t in (q, k, v))  # the reference sees the kernel's inputs
    scale = math.sqrt(d) if normalized else 1 / math.sqrt(d)
    probe = torch.randn(b, heads[0], s, d, device="cuda", generator=gen)
    out, grads = grads_of(lambda *t: attention(*t, scale=scale, window=window),
                          [t.bfloat16() for t in (q, k, v)], probe)
    ref, ref_grads = grads_of(lambda *t: reference(*t, scale, window).float(), [q, k, v], probe)
    assert_bf16_close(out, ref, "out")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_bf16_close(g, r, f"d{name}")


@pytest.mark.parametrize("mode", ["matched", "expressive"])
def test_windowed_diff_core_on_cuda_equals_cpu_float32(mode):
    cfg = NeonConfig(num_layers=2, hidden_size=1024, num_attention_heads=16, num_query_groups=8,
                     ffn_hidden_size=2816, vocab_size=1024, max_position_embeddings=2048,
                     diff_attention=mode, sliding_window=256)
    torch.manual_seed(0)
    core = DiffCoreAttention(cfg, 3, AttnMaskType.causal, "self").bfloat16().float()  # bf16 values
    lay, s, b = core.layout, 1024, 2
    inputs = [torch.randn(s, b, 2 * lay.heads, lay.qk_dim), torch.randn(s, b, 2 * lay.groups, lay.qk_dim),
              torch.randn(s, b, lay.groups, lay.v_dim)]
    inputs = [t.bfloat16().float() for t in inputs]
    probe = torch.randn(s, b, lay.heads * lay.v_dim)
    ref, ref_grads = grads_of(core, inputs, probe)  # CPU float32: SDPA with the window mask
    cuda_core = copy.deepcopy(core).cuda().bfloat16()
    out, grads = grads_of(cuda_core, [t.cuda().bfloat16() for t in inputs], probe.cuda())  # FlexAttention
    # A_1 V - lambda A_2 V and the norm in bf16 on top of the kernel's error: 5e-2
    assert_bf16_close(out.cpu(), ref, "out", tol=5e-2)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_bf16_close(g.cpu(), r, f"d{name}", tol=5e-2)
