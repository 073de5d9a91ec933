"""Context-parallel attention (neon/context_parallel.py) against the whole-sequence kernel.

On real gloo process groups of 2 and 4 ranks, each rank takes its two chunks of q/k/v
(megatron's head-tail split) and runs `attention` with its CP group; its output and the
gradients of its q/k/v chunks must be the rows of the single-process attention over the whole
sequence, with grouped-query heads, without a window, with a window narrower than a chunk (the
last W - 1 keys of the chunk before, from a neighbour rank point to point), one exactly a chunk
wide and one wider (whole chunks gathered), and with document masks.

Bound. In float64 the two computations differ only in the order of the softmax and value sums
(at most S = 32 terms each) and in the sum of the gathered key/value gradients over the ranks:
a few ulps of 2^-53 times the terms' magnitude (all O(1) here), so 1e-12 absolute and relative is
far above the rounding and far below any masking or gathering mistake (which moves values by O(0.1)).
"""

import pytest
import torch
from megatron.core import parallel_state

from neon.attention import attention
from neon.context_parallel import local_chunks
from tests.dist import run_distributed

B, HQ, HKV, S, D = 2, 4, 2, 32, 8
TOL = dict(atol=1e-12, rtol=1e-12)  # see the module docstring


def inputs(with_documents: bool):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, S, D, generator=gen, dtype=torch.float64) for h in (HQ, HKV, HKV))
    docs = None
    if with_documents:  # documents of 5, 11 and 16 tokens in row 0, one document in row 1
        docs = torch.stack([torch.tensor([0] * 5 + [1] * 11 + [2] * 16), torch.zeros(S, dtype=torch.long)])
    return q, k, v, docs


def cp_against_whole(window, with_documents):
    group = parallel_state.get_context_parallel_group()
    q, k, v, docs = inputs(with_documents)
    grad_out = torch.randn(B, HQ, S, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention(*whole, scale=D ** -0.5, window=window, documents=docs)
    ref.backward(grad_out)

    mine = [local_chunks(t, group, dim=2).requires_grad_() for t in (q, k, v)]
    out = attention(*mine, scale=D ** -0.5, window=window, documents=docs, cp_group=group)
    out.backward(local_chunks(grad_out, group, dim=2))

    expected = [local_chunks(t, group, dim=2) for t in [ref] + [w.grad for w in whole]]
    return [out.detach()] + [m.grad for m in mine], expected


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("window,with_documents", [(None, False), (3, False), (7, False), (9, False), (None, True),
                                                   (6, True)],
                         ids=["causal", "window-in-chunk", "window-over-chunks", "window-of-a-chunk", "documents",
                              "window-documents"])
def test_context_parallel_attention_gives_the_whole_sequence_rows_and_gradients(cp, window, with_documents):
    # chunks of S / (2 CP) = 8 (CP=2) or 4 (CP=4) tokens: window 3 needs part of one earlier chunk
    # (a neighbour's), window 7 at CP=4 needs two earlier chunks, window 9 at CP=2 one whole chunk
    for got, expected in run_distributed(cp_against_whole, cp, cp=cp,
                                         kwargs=dict(window=window, with_documents=with_documents)):
        for name, g, e in zip(["output", "dq", "dk", "dv"], got, expected):
            torch.testing.assert_close(g, e, **TOL, msg=lambda m, n=name: f"{n}: {m}")
