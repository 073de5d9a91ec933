"""The CPU path for a query chunk at the end of longer keys (a context-parallel chunk): two
mask-free flash calls merged by log-sum-exp, and its own backward. Output and q/k/v gradients
against the independent float64 reference of test_attention (scores materialised, loop mask)."""

import math

import pytest
import torch

from neon import chunk_attention
from neon.attention import attention
from tests.neon.test_attention import HEADS, inputs, reference

F64_TOL = dict(rtol=1e-10, atol=1e-10)  # float64 sums of <= 64 terms of order one: ~1e-15 each


def grads(fn, q, k, v, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("normalized", [False, True])
def test_merged_chunk_matches_reference_with_gradients(heads, normalized):
    """12 queries at the end of 40 keys, float64: out, dq, dk, dv."""
    h, h_kv = heads
    q, _, _ = inputs(2, h, h_kv, 12, 8, normalized=normalized, seed=5)
    _, k, v = inputs(2, h, h_kv, 40, 8, normalized=normalized, seed=6)
    q, k, v = q.double(), k.double(), v.double()
    scale = math.sqrt(8) if normalized else 1 / math.sqrt(8)
    assert chunk_attention.available(q, k, v)
    grad_out = torch.randn(2, h, 12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    got = grads(lambda *t: chunk_attention.chunk_causal_attention(*t, scale=scale), q, k, v, grad_out)
    expected = grads(lambda *t: reference(*t, scale, None), q, k, v, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, **F64_TOL, msg=name)


def test_cpu_chunk_attention_saves_no_mask():
    """`attention` on a CPU chunk takes the merged path: nothing [sq, sk] is saved for the backward
    (the SDPA path saves its additive mask). A window narrower than the keys still needs the mask."""
    q, _, _ = inputs(1, 4, 2, 16, 8, seed=1)
    _, k, v = inputs(1, 4, 2, 48, 8, seed=2)
    q.requires_grad_()

    def saved_shapes(window):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            attention(q, k, v, scale=0.3, window=window)
        return shapes

    assert (16, 48) not in saved_shapes(None)
    assert (16, 48) in saved_shapes(20)


def test_values_wider_than_keys_take_the_mask_path():
    """The flash kernel needs d_v == d: wider values go to SDPA with the mask, same result."""
    q, _, _ = inputs(1, 4, 2, 12, 8, seed=3)
    _, k, v = inputs(1, 4, 2, 40, 8, d_v=16, seed=4)
    assert not chunk_attention.available(q, k, v)
    torch.testing.assert_close(attention(q, k, v, scale=0.3, window=None).double(), reference(q, k, v, 0.3, None),
                               rtol=1e-5, atol=1e-5)
