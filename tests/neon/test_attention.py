"""Local core attention on the CPU: SDPA (the CPU training path) and FlexAttention's forward (the
CUDA windowed path; its CPU backward does not run in torch 2.13) against an independent float64
reference (scores materialised, K/V copied per query head, causal + window mask by loops)."""

import math

import pytest
import torch

from neon.attention import attention, causal_window_mask, flex_window_attention, sdpa

# the eager FlexAttention tests run its reference implementation on purpose
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def reference(q, k, v, scale, window):
    """float64 softmax(q k^T scale + mask) v with K/V repeated per query head; query i is token
    sk - sq + i and sees keys j with i' - window < j <= i'."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    sq, sk = q.size(2), k.size(2)
    allowed = torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
    for i in range(sq):
        pos = sk - sq + i
        lo = 0 if window is None else max(0, pos - window + 1)
        allowed[i, lo:pos + 1] = True
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def inputs(b, h, h_kv, s, d, d_v=None, normalized=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=gen)
    k = torch.randn(b, h_kv, s, d, generator=gen)
    v = torch.randn(b, h_kv, s, d_v or d, generator=gen)
    if normalized:  # nGPT: unit q/k, softmax scale sqrt(d) (scores in [-sqrt(d), sqrt(d)])
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    return q, k, v


# (query heads, key/value heads): MHA, GQA 4:1, DiffAttention's 2n over 2g, and 2h per group (V2)
HEADS = [(4, 4), (8, 2), (12, 4), (8, 1)]
FP32_TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 softmax and products over <= 64 terms of order one


def test_causal_window_mask_marks_exactly_the_window():
    mask = causal_window_mask(4, 6, 3, "cpu")  # queries are tokens 2..5
    expected = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]])
    assert torch.equal(mask, expected.bool())
    assert causal_window_mask(6, 6, 6, "cpu") is None and causal_window_mask(6, 6, None, "cpu") is None


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("normalized", [False, True])
def test_cpu_sdpa_path_matches_reference(heads, window, normalized):
    d = 16
    q, k, v = inputs(2, *heads, 40, d, normalized=normalized)
    scale = math.sqrt(d) if normalized else 1 / math.sqrt(d)
    out = attention(q, k, v, scale=scale, window=window)  # CPU: SDPA, enable_gqa, mask for the window
    assert out.shape == (2, heads[0], 40, d)
    torch.testing.assert_close(out.double(), reference(q, k, v, scale, window), **FP32_TOL)


def test_cpu_sdpa_path_takes_wider_values():
    q, k, v = inputs(1, 8, 2, 24, 8, d_v=16)  # DiffAttention 'matched' with dropout: d_v = 2d
    out = sdpa(q, k, v, scale=0.3, window=7)
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.3, 7), **FP32_TOL)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("window", [3, 16, 64])
@pytest.mark.parametrize("normalized", [False, True])
def test_flex_block_mask_forward_matches_reference(heads, window, normalized):
    """FlexAttention's eager forward with the block mask (the mask function the kernel uses)."""
    d = 16
    q, k, v = inputs(1, *heads, 48, d, normalized=normalized, seed=1)
    scale = math.sqrt(d) if normalized else 1 / math.sqrt(d)
    out = flex_window_attention(q, k, v, scale=scale, window=window, compiled=False)
    torch.testing.assert_close(out.double(), reference(q, k, v, scale, min(window, 48)), **FP32_TOL)


@pytest.mark.parametrize("window", [None, 5])
def test_fewer_queries_than_keys_are_the_last_positions(window):
    """A context-parallel chunk: 12 queries at the end of 40 keys, causal (SDPA's is_causal would
    align query 0 with key 0) or windowed, on the CPU path (merged flash calls without a window,
    SDPA with its mask with one) and FlexAttention's eager forward."""
    q, _, _ = inputs(2, 4, 2, 12, 8, seed=3)
    _, k, v = inputs(2, 4, 2, 40, 8, seed=4)
    expected = reference(q, k, v, 0.3, window)
    torch.testing.assert_close(attention(q, k, v, scale=0.3, window=window).double(), expected, **FP32_TOL)
    flex = flex_window_attention(q, k, v, scale=0.3, window=window, compiled=False)
    torch.testing.assert_close(flex.double(), expected, **FP32_TOL)


def test_compiled_flex_forward_skips_blocks_and_matches_reference():
    """The compiled FlexAttention kernel (as on CUDA) on 3 blocks of 128: with window 64 the last
    query block never sees the first key block, which the block mask skips. GQA 4:1, nGPT scale."""
    s, d, window = 384, 16, 64
    q, k, v = inputs(1, 8, 2, s, d, normalized=True, seed=2)
    from neon.attention import window_block_mask

    block_mask = window_block_mask(s, s, window, torch.device("cpu"))
    assert block_mask.sparsity() > 0  # some key blocks are skipped entirely
    with torch.no_grad():
        out = flex_window_attention(q, k, v, scale=math.sqrt(d), window=window)
    torch.testing.assert_close(out.double(), reference(q, k, v, math.sqrt(d), window), **FP32_TOL)


def test_heads_that_do_not_divide_are_refused():
    q, k, v = inputs(1, 6, 4, 8, 8)
    with pytest.raises(ValueError, match="6 query heads over 4 key"):
        attention(q, k, v, scale=1.0, window=None)
