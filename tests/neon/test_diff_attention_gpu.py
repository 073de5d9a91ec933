"""DiffAttention on a CUDA device: the fused SDPA kernels (flash where the shapes allow it,
memory-efficient otherwise) give the math kernel's result, forward and backward, in bf16.
Without a window only: a window runs on FlexAttention whatever SDPA backend is chosen
(tests/neon/test_attention_gpu.py checks it against the CPU path)."""

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from torch.nn.attention import SDPBackend, sdpa_kernel

from neon.config import NeonConfig
from neon.diff_attention import DiffCoreAttention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SIZES = dict(num_layers=2, hidden_size=1024, num_attention_heads=16, num_query_groups=8,
             ffn_hidden_size=2816, vocab_size=1024, max_position_embeddings=2048)


def run_core(core, inputs, backends, probe):
    """Output and gradients of <out, probe> (a random projection: every gradient of order one)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in inputs)
    core.zero_grad(set_to_none=True)
    with sdpa_kernel(backends):
        out = core(q, k, v)
    (out.float() * probe.flatten(2)).sum().backward()
    grads = [q.grad, k.grad, v.grad, core.lambda_q1.grad, core.subln.weight.grad]
    return out.detach().float(), [g.detach().float() for g in grads]


@pytest.mark.parametrize("mode", ["matched", "expressive"])
def test_fused_sdpa_equals_math_kernel(mode):
    cfg = NeonConfig(**SIZES, diff_attention=mode, bf16=True,
                     params_dtype=torch.bfloat16)
    torch.manual_seed(0)
    core = DiffCoreAttention(cfg, 3, AttnMaskType.causal, "self").cuda().to(torch.bfloat16)
    lay, s, b = core.layout, 1024, 2
    inputs = (torch.randn(s, b, 2 * lay.heads, lay.qk_dim, device="cuda", dtype=torch.bfloat16),
              torch.randn(s, b, 2 * lay.groups, lay.qk_dim, device="cuda", dtype=torch.bfloat16),
              torch.randn(s, b, lay.groups, lay.v_dim, device="cuda", dtype=torch.bfloat16))
    # SDPA takes flash where it can (equal q/k/v widths, no explicit mask), else memory-efficient
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    probe = torch.randn(inputs[0].shape[:2] + (lay.heads, lay.v_dim), device=inputs[0].device)
    out, grads = run_core(core, inputs, fused, probe)
    ref_out, ref_grads = run_core(core, inputs, [SDPBackend.MATH], probe)
    assert torch.isfinite(out).all() and ref_out.abs().max() > 0.1
    torch.testing.assert_close(out, ref_out, rtol=2e-2, atol=2e-2)
    # bf16 gradients (the lambda and norm-scale ones are long bf16 reductions): 5% of the largest
    for name, g, ref in zip(("q", "k", "v", "lambda_q1", "subln"), grads, ref_grads):
        rel = ((g - ref).abs().max() / ref.abs().max()).item()
        assert ref.abs().max() > 1e-3 and rel < 5e-2, (name, rel)


def test_v2_fused_sdpa_equals_math_kernel():
    """DiffAttention V2's core (one call over 2H query heads, then the pair difference) with the
    V1 layouts' bounds: the same bf16 kernels and reductions, without the head norm."""
    from neon.diff_attention_v2 import DiffV2CoreAttention

    cfg = NeonConfig(**SIZES, diff_attention="v2", bf16=True, params_dtype=torch.bfloat16)
    torch.manual_seed(0)
    core = DiffV2CoreAttention(cfg, 3, AttnMaskType.causal, "self").cuda()
    lay, s, b = core.layout, 1024, 2
    r = lay.heads_per_group
    inputs = [torch.randn(s, b, 2 * lay.heads, lay.head_dim, device="cuda", dtype=torch.bfloat16),
              torch.randn(s, b, lay.groups, lay.head_dim, device="cuda", dtype=torch.bfloat16),
              torch.randn(s, b, lay.groups, lay.head_dim + r, device="cuda", dtype=torch.bfloat16)]
    probe = torch.randn(s, b, lay.heads * lay.head_dim, device="cuda")
    results = []
    for backends in ([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], [SDPBackend.MATH]):
        q, k, v = (t.detach().clone().requires_grad_() for t in inputs)
        with sdpa_kernel(backends):
            out = core(q, k, v)
        (out.float() * probe).sum().backward()
        results.append((out.detach().float(), [t.grad.detach().float() for t in (q, k, v)]))
    (out, grads), (ref_out, ref_grads) = results
    assert torch.isfinite(out).all() and ref_out.abs().max() > 0.1
    torch.testing.assert_close(out, ref_out, rtol=2e-2, atol=2e-2)
    for name, g, ref in zip(("q", "k", "v and lambda logits"), grads, ref_grads):
        rel = ((g - ref).abs().max() / ref.abs().max()).item()
        assert ref.abs().max() > 1e-3 and rel < 5e-2, (name, rel)
